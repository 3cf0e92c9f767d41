"""What every ``emmae-*`` command shares, the trainer's and the exporter's too: the argument parser,
the general options and the log.

* :class:`Parser`: an unknown option answered with the nearest known one; ``-g N`` as crYOLO takes it;
* :func:`add_common_arguments`: ``--device``, ``--threads``, ``-v``/``-q`` and ``--version``;
  :func:`choose_gpu` makes ``-g N``'s GPU the one this process sees;
* :func:`setup_logging` and :func:`progress_bar`: log lines that never land on a progress bar.

The picking commands' own options (outputs, classes, web view) are in :mod:`emmae.runtime.options`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Iterable, Iterator

from emmae import __version__
from emmae.errors import ConfigError

DEVICES = ("auto", "cpu", "gpu")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def plain_text(doc: str | None) -> str:
    """A docstring as plain ``--help`` text: no reStructuredText literals (double backquotes, ``::``)."""
    text = (doc or "").replace("``", "").replace("::\n", ":\n")
    return text.replace("\\\n", "\n")


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
