"""Command-line options that several commands share, defined once.

* :func:`add_output_arguments` / :func:`output_switches`: what ``emmae-pick`` and
  ``emmae-stream`` write (formats, coordinate switches, names, pixel size);
* :func:`add_common_arguments`: ``--device``, ``--threads``, ``-v``/``-q`` and ``--version``;
* :func:`setup_logging` and :func:`progress_bar`: log lines that never land on a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from emmae import __version__
from emmae.config import EmmaeConfig
from emmae.errors import ConfigError

FORMATS = ("star", "box", "cbox")
DEVICES = ("auto", "cpu", "gpu")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def default(field: str) -> Any:
    """The default of the configuration field ``field`` (``section.name``), for a help text: each default is written once,
    in :mod:`emmae.config`."""
    section, name = field.split(".")
    return getattr(getattr(EmmaeConfig(), section), name)


def tiles_help() -> str:
    """``--batch-tiles``' help, shared by the commands that encode."""
    tiles = default("model.batch_tiles")
    return (f"64x64 tiles the encoder takes per run (default {tiles}, a whole {math.isqrt(tiles) * 64}-px grid); lower it when "
            "memory is short")


def plain_text(doc: str | None) -> str:
    """A docstring as plain ``--help`` text: no reStructuredText literals (double backquotes, ``::``)."""
    text = (doc or "").replace("``", "").replace("::\n", ":\n")
    return text.replace("\\\n", "\n")


def add_output_arguments(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None) -> None:
    """The output options of ``emmae-pick`` and ``emmae-stream`` (in ``group``, default a new group
    "output"); read them back with :func:`output_switches`."""
    group = group or parser.add_argument_group("output")
    group.add_argument("--format", nargs="+", choices=FORMATS, metavar="FORMAT",
                       help="per-micrograph coordinate files, one or more of: star (RELION <stem>_autopick.star), "
                            "box (EMAN <stem>.box), cbox (crYOLO <stem>.cbox, every candidate with its score); default: star")
    group.add_argument("--flip-y", action="store_true",
                       help="write y as (height - 1 - y), for micrographs that the next program reads upside down "
                            "(e.g. cryoSPARC Patch Motion output); default: y as in the file")
    group.add_argument("--scale", type=float, metavar="FACTOR",
                       help=f"multiply the written coordinates by FACTOR (picks made on binned micrographs); default "
                            f"{default('output.coordinate_scale'):g}")
    group.add_argument("--strip-prefix", metavar="TEXT", help="remove TEXT from the start of the written micrograph names")
    group.add_argument("--add-prefix", metavar="TEXT", help="add TEXT to the start of the written micrograph names")
    group.add_argument("--pixel-size-A", type=float, metavar="A",
                       help="pixel size in Angstrom, overriding the micrograph headers (used with --diameter-A)")
    group.add_argument("--project-root", type=Path, metavar="DIR",
                       help="the RELION project folder: names in a micrographs STAR are relative to it, and written names are made "
                            "relative to it; default: the current folder (emmae-pick), the watched folder's parent (emmae-stream)")
    group.add_argument("--voltage-kV", type=float, metavar="KV",
                       help="particles.star's optics block: voltage (default: the micrographs STAR's, else 300)")
    group.add_argument("--spherical-aberration-mm", type=float, metavar="MM",
                       help="particles.star's optics block: spherical aberration (default: the micrographs STAR's, else 2.7)")
    group.add_argument("--amplitude-contrast", type=float, metavar="FRACTION",
                       help="particles.star's optics block: amplitude contrast (default: the micrographs STAR's, else 0.1)")


def class_numbers(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``: session class numbers as ``emmae-classes.png`` shows them."""
    try:
        numbers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"class numbers are whole numbers separated by commas (as emmae-classes.png shows them), got {text!r}") from None
    if any(n < 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"class numbers start at 0, got {text!r}")
    return numbers


def add_class_arguments(group: argparse._ArgumentGroup) -> None:
    """``--keep-classes`` / ``--drop-classes``: overrule the session's choice of particle classes."""
    group.add_argument("--keep-classes", type=class_numbers, metavar="N,N", help="session classes to keep though the session dropped them "
                       "(numbers as emmae-classes.png shows them); with --rethreshold, re-cuts without encoding")
    group.add_argument("--drop-classes", type=class_numbers, metavar="N,N", help="session classes to drop though the session kept them")


def class_switches(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    return {("postprocess", "keep_classes"): getattr(args, "keep_classes", None), ("postprocess", "drop_classes"): getattr(args, "drop_classes", None)}


def add_http_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--http [HOST:]PORT`` and ``--http-token`` (shared with emmae-stream)."""
    group = parser.add_argument_group("web view")
    group.add_argument("--http", metavar="[HOST:]PORT", default=default,
                       help="serve the read-only web view at this address; 127.0.0.1 when only a port is given; any other host "
                            f"needs a token{f' (default {default})' if default else ' (default: off)'}")
    group.add_argument("--http-token", metavar="TOKEN",
                       help="the token every request must carry (?token=TOKEN; the page passes it on); beyond loopback one is "
                            "generated and logged when none is given")


def output_switches(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """``(section, field) -> value`` of the options of :func:`add_output_arguments` (None: not given)."""
    return {
        ("output", "formats"): args.format, ("output", "flip_y"): args.flip_y or None,
        ("output", "coordinate_scale"): args.scale, ("output", "strip_prefix"): args.strip_prefix,
        ("output", "add_prefix"): args.add_prefix, ("preprocess", "pixel_size_A"): args.pixel_size_A,
        ("output", "project_root"): args.project_root and str(args.project_root),
        ("output", "voltage_kV"): args.voltage_kV, ("output", "spherical_aberration_mm"): args.spherical_aberration_mm,
        ("output", "amplitude_contrast"): args.amplitude_contrast,
    }


class Parser(argparse.ArgumentParser):
    """An argument parser that answers an unknown option with the nearest known one (``--treshold``: did you mean ``--threshold``?),
    and takes a GPU number after ``-g``/``--gpu`` as crYOLO does (``-g 0``; see :func:`choose_gpu`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            known = [o for action in self._actions for o in action.option_strings if action.help != argparse.SUPPRESS]
            hints = []
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6) if word.startswith("-") else []
                if close:
                    hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]  # noqa: ANN001 - argparse's signature
        given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._gpu_numbers(given) if "--gpu" in self._option_string_actions else given, namespace)

    def _gpu_numbers(self, given: list[str]) -> list[str]:
        """``-g N``, ``--gpu N``, ``--gpu=N`` and ``-gN`` as ``--gpu --gpu-number=N`` (a bare ``-g`` stays: any GPU)."""
        out: list[str] = []
        i = 0
        while i < len(given):
            word = given[i]
            i += 1
            if word == "--":
                return out + given[i - 1 :]
            flag, number = _gpu_flag(word)
            if flag is None:
                out.append(word)
                continue
            numbers = [number] if number else []
            while not number and i < len(given) and given[i].isdigit():
                numbers.append(given[i])
                i += 1
            if len(numbers) > 1:
                self.error(f"{flag} {' '.join(numbers)}: one GPU per process; give one number (e.g. {flag} {numbers[0]}), or none for any GPU")
            out += ["--gpu", *(f"--gpu-number={n}" for n in numbers)]
        return out


def _gpu_flag(word: str) -> tuple[str | None, str]:
    """(``-g`` or ``--gpu``, the number written onto it or '') when ``word`` is the GPU option, else (None, '')."""
    if word in ("-g", "--gpu"):
        return word, ""
    if word.startswith("--gpu="):
        return "--gpu", word[len("--gpu="):]
    if word.startswith("-g") and word[2:].isdigit():
        return "-g", word[2:]
    return None, ""


def add_common_arguments(parser: argparse.ArgumentParser, *, device: bool = True, threads: bool = True, verbosity: bool = True) -> None:
    """``--device`` (auto/cpu/gpu; ``-g``/``--gpu`` for gpu), ``-j``/``--threads``, ``-v``/``-q`` and ``--version``."""
    group = parser.add_argument_group("general")
    if device:
        group.add_argument("--device", choices=DEVICES,
                           help="where to compute: gpu (fails when no GPU is usable), cpu, or auto (the GPU when one is usable; default)")
        group.add_argument("-g", "--gpu", dest="device", action="store_const", const="gpu",
                           help="the same as --device gpu; -g N (as crYOLO's) picks on GPU number N")
        group.add_argument("--gpu-number", type=int, help=argparse.SUPPRESS)  # what -g N sets (see Parser)
    if threads:
        group.add_argument("-j", "--threads", type=int, metavar="N", help="CPU threads to use (default: all cores)")
    if verbosity:
        group.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (debug messages)")
        group.add_argument("-q", "--quiet", action="count", default=0, help="fewer log lines: -q warnings and errors only, -qq errors only")
    group.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")


def choose_gpu(args: argparse.Namespace, environ: dict[str, str] | None = None) -> None:
    """Make GPU number ``-g N`` the one this process sees (``CUDA_VISIBLE_DEVICES``; counted within it when a scheduler
    set it already). Call before anything opens the GPU.

    Raises:
        ConfigError: there is no GPU of that number among those visible.
    """
    number = getattr(args, "gpu_number", None)
    if number is None:
        return
    environ = os.environ if environ is None else environ
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and not 0 <= number < len(visible):
        raise ConfigError(f"-g {number}: only {len(visible)} GPU(s) are visible to this process (CUDA_VISIBLE_DEVICES="
                          f"{environ['CUDA_VISIBLE_DEVICES']}); give a number from 0 to {len(visible) - 1}")
    environ["CUDA_VISIBLE_DEVICES"] = visible[number] if visible else str(number)


def log_level(args: argparse.Namespace) -> int:
    """INFO, one step down per ``-v`` and up per ``-q``."""
    steps = getattr(args, "quiet", 0) - getattr(args, "verbose", 0)
    return min(max(logging.INFO + 10 * steps, logging.DEBUG), logging.CRITICAL)


def setup_logging(args: argparse.Namespace, handler: logging.Handler | None = None) -> None:
    """Log at the level that ``-v``/``-q`` ask for: to stderr (unless logging is set up already), or through
    ``handler`` (e.g. a status line redrawn under the log)."""
    level = log_level(args)
    if handler is None:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger().setLevel(level)


@contextlib.contextmanager
def progress_bar(items: Iterable, total: int, unit: str, enabled: bool | None = None) -> Iterator[Iterable]:
    """``items`` behind a tqdm progress bar on an interactive terminal (``enabled=None``: when
    stderr is a terminal and INFO lines are shown). While the bar is shown, log lines are written
    above it, never onto it."""
    if enabled is None:
        enabled = sys.stderr.isatty() and logging.getLogger().isEnabledFor(logging.INFO)
    if not enabled:
        yield items
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), tqdm(items, total=total, unit=unit, dynamic_ncols=True, file=sys.stderr) as bar:
        yield bar
