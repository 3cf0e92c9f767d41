"""The picking commands' shared options, defined once (``emmae-pick``, ``emmae-stream``, ``emmae-view``):

* :func:`add_output_arguments` / :func:`output_switches`: what ``emmae-pick`` and
  ``emmae-stream`` write (formats, coordinate switches, names, pixel size);
* :func:`add_class_arguments` / :func:`class_switches`: ``--keep-classes`` / ``--drop-classes``;
* :func:`add_http_arguments`: the web view's address and token.

What every command shares (the parser, ``--device``, ``-v``/``-q``, logging) is :mod:`emmae.commandline`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emmae.config import EmmaeConfig
from emmae.runtime.picking.encoder import CPU_BATCH_TILES, GPU_BATCH_TILES

FORMATS = ("star", "box", "cbox")


def default(field: str) -> Any:
    """The default of the configuration field ``field`` (``section.name``), for a help text: each default is written once,
    in :mod:`emmae.config`."""
    section, name = field.split(".")
    return getattr(getattr(EmmaeConfig(), section), name)


def tiles_help() -> str:
    """``--batch-tiles``' help, shared by the commands that encode."""
    return (f"64x64 tiles the encoder takes per run (default {CPU_BATCH_TILES} on the CPU, {GPU_BATCH_TILES} on a GPU; "
            "the latents of fp32 models do not depend on it); lower it when memory is short")


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
