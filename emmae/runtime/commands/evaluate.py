"""emmae-eval: score picks against ground truth with the paper's metric.

Pick files are matched to truth files by micrograph stem. One pick file per micrograph is
scored, of the format chosen with --picks-format: star (default: <stem>_autopick.star, or
<stem>.star), box (<stem>.box), cbox (<stem>.cbox: every candidate, before any threshold)
or csv (<stem>.csv, columns x and y). Truth files are <stem>.star, .csv, .box or .cbox;
of a stem with several, the first in that order is read unless --truth-format chooses.

When the picks folder records (in emmae-config.json) that coordinates were written with
--flip-y or --scale, they are undone before scoring, with each micrograph's height from
the folder's micrographs.star; a flip that cannot be undone is warned about.

Prints one row per micrograph and the pooled scores, for the one-to-one metric (the
headline: boxes of the particle diameter, IoU > 0.6, one-to-one matching) and the
reference code's nearest-match variant. Exit status: 0 scored, 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path, PurePath

import numpy as np

from emmae.io.atomic import write_bytes_atomic
from emmae.io.star import read_star
from emmae.io.truth import CoordinateFileError, read_centres
from emmae.metrics import Score, score_micrograph
from emmae.commandline import Parser, add_common_arguments, setup_logging

log = logging.getLogger("emmae.eval")
FORMATS = ("star", "box", "cbox", "csv")
PREFERENCE = ("star", "csv", "box", "cbox")  # when a stem has several files: exact centres first
INDEX_FILES = ("autopick.star", "particles.star", "micrographs.star", "failed.star")
PICK_TAG = "_autopick"

EXAMPLES = """examples:
  emmae-eval --picks emmae_picks --truth coordinates/ --diameter-px 56 --json scores.json
  emmae-eval --picks emmae_picks --truth coordinates/ --diameter-A 300 --picks-format box
"""


class EvaluationError(ValueError):
    """Inputs that cannot be scored (no common micrographs, ambiguous files, no usable diameter)."""


def coordinate_files(folder: Path, fmt: str | None = None) -> dict[str, Path]:
    """Stem -> coordinate file in ``folder``: of format ``fmt``, or (None) one per stem, the first of
    STAR, CSV, BOX, CBOX that it has.

    For ``star``, ``<stem>_autopick.star`` is taken before ``<stem>.star``; the index files
    (``autopick.star``, ``particles.star``, ``micrographs.star``) are never coordinate files.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
    """
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    several: set[str] = set()
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in FORMATS or (fmt is not None and suffix != fmt) or path.name in INDEX_FILES or not path.is_file():
            continue
        stem = path.stem
        tagged = suffix == "star" and stem.endswith(PICK_TAG)
        stem = stem.removesuffix(PICK_TAG) if tagged else stem
        other = found.get(stem)
        if other is not None:
            rank = PREFERENCE.index(other.suffix.lower().lstrip("."))
            if rank != PREFERENCE.index(suffix):
                several.add(stem)
                if PREFERENCE.index(suffix) > rank:
                    continue
            elif not tagged:
                continue  # <stem>_autopick.star wins over <stem>.star
        found[stem] = path
    if several:
        log.info("%s holds several formats for %d micrographs: reading %s (choose with --truth-format)", folder, len(several),
                 ", ".join(sorted({p.suffix for p in found.values()})))
    return found


def recorded_output(picks: Path) -> dict:
    """The output switches recorded in the picks folder's ``emmae-config.json`` ({} when there is none)."""
    try:
        record = json.loads((picks / "emmae-config.json").read_text())
        return dict(record["config"]["output"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s); coordinates are scored as written", picks / "emmae-config.json", exc)
        return {}


def micrograph_table(picks: Path) -> dict[str, tuple[int, float]]:
    """Stem -> (height in pixels, pixel size in A or 0) from the picks folder's ``micrographs.star``."""
    path = picks / "micrographs.star"
    if not path.is_file():
        return {}
    table = {}
    for frame in read_star(path).values():
        if {"rlnMicrographName", "rlnImageSizeY"} <= set(frame.columns):
            pixel = frame["rlnMicrographPixelSize"] if "rlnMicrographPixelSize" in frame.columns else [0.0] * len(frame)
            for name, ny, px in zip(frame["rlnMicrographName"], frame["rlnImageSizeY"], pixel, strict=True):
                table[PurePath(str(name)).stem] = (int(ny), float(px))
    return table


def undo_output_switches(xy: np.ndarray, output: dict, height: int | None) -> np.ndarray | None:
    """Coordinates as picked (micrograph pixels) from coordinates written under ``output``'s
    ``coordinate_scale`` and ``flip_y``; None when a flip is recorded but the height is unknown."""
    out = np.array(xy, dtype=np.float64).reshape(-1, 2) / float(output.get("coordinate_scale") or 1.0)
    if output.get("flip_y"):
        if height is None:
            return None
        out[:, 1] = height - 1 - out[:, 1]
    return out


def resolve_diameters(stems: list[str], diameter_px: float | None, diameter_A: float | None, pixel_size_A: float | None,
                      table: dict[str, tuple[int, float]]) -> dict[str, float]:
    """Each micrograph's particle diameter in pixels.

    Raises:
        EvaluationError: no diameter, a non-positive one, or a diameter in Angstrom without a pixel size.
    """
    for flag, value in (("--diameter-px", diameter_px), ("--diameter-A", diameter_A), ("--pixel-size-A", pixel_size_A)):
        if value is not None and not value > 0:
            raise EvaluationError(f"{flag} must be positive, got {value}")
    if (diameter_px is None) == (diameter_A is None):
        raise EvaluationError("give the particle diameter with --diameter-px or --diameter-A (one of them)")
    if diameter_px is not None:
        return dict.fromkeys(stems, float(diameter_px))
    out = {}
    for stem in stems:
        pixel = pixel_size_A or table.get(stem, (0, 0.0))[1]
        if not pixel > 0:
            raise EvaluationError(f"--diameter-A needs a pixel size for {stem}: the picks folder's micrographs.star has none; "
                                  "give --pixel-size-A")
        out[stem] = float(diameter_A) / pixel
    return out


def evaluate(picks: Path, truth: Path, diameter_px: float | None = None, *, picks_format: str = "star", truth_format: str | None = None,
             diameter_A: float | None = None, pixel_size_A: float | None = None) -> dict:
    """Per-micrograph and pooled scores for both matching modes.

    Raises:
        EvaluationError: nothing to score, or no usable diameter.
        CoordinateFileError: a coordinate file that cannot be read.
        NotADirectoryError: a folder that is not one.
    """
    if picks_format not in FORMATS:
        raise EvaluationError(f"unknown picks format {picks_format!r}: one of {', '.join(FORMATS)}")
    pick_files, truth_files = coordinate_files(picks, picks_format), coordinate_files(truth, truth_format)
    common = sorted(set(pick_files) & set(truth_files))
    if not common:
        raise EvaluationError(f"no micrograph has both {picks_format} picks in {picks} and truth in {truth}")
    output, table = recorded_output(picks), micrograph_table(picks)
    diameters = resolve_diameters(common, diameter_px, diameter_A, pixel_size_A, table)
    if output.get("flip_y") or (output.get("coordinate_scale") or 1.0) != 1.0:
        log.info("undoing the recorded output switches (flip_y %s, scale %g) of %s", bool(output.get("flip_y")),
                 output.get("coordinate_scale") or 1.0, picks)
    rows, pooled = [], {"one-to-one": Score(0, 0, 0, 0.0), "nearest": Score(0, 0, 0, 0.0)}
    not_unflipped = []
    for stem in common:
        written = read_centres(pick_files[stem])
        picked = undo_output_switches(written, output, table.get(stem, (None, 0.0))[0])
        if picked is None:
            not_unflipped.append(stem)
            picked = written / float(output.get("coordinate_scale") or 1.0)
        expected = read_centres(truth_files[stem])
        row = {"micrograph": stem, "picks_file": str(pick_files[stem]), "diameter_px": diameters[stem]}
        for mode in pooled:
            score = score_micrograph(picked, expected, diameters[stem], mode)
            pooled[mode] = pooled[mode] + score
            row[mode] = score.to_dict()
        rows.append(row)
    if not_unflipped:
        log.warning("%d micrographs were written with --flip-y but their heights are not in %s (e.g. %s): scored as written, "
                    "which is wrong unless the truth is flipped too", len(not_unflipped), picks / "micrographs.star", not_unflipped[0])
    missing = sorted(set(truth_files) - set(pick_files))
    values = sorted(set(diameters.values()))
    return {"diameter_px": values[0] if len(values) == 1 else None, "picks_format": picks_format, "micrographs": rows,
            "pooled": {m: s.to_dict() for m, s in pooled.items()}, "without_picks": missing,
            "not_unflipped": not_unflipped}


def print_report(report: dict) -> None:
    print(f"{'micrograph':<32} {'truth':>6} {'picks':>6} {'TP':>5} {'prec':>6} {'recall':>6} {'F1':>6} {'F1 nearest':>10}")
    for row in report["micrographs"]:
        one, near = row["one-to-one"], row["nearest"]
        print(f"{row['micrograph']:<32} {one['truths']:>6} {one['picks']:>6} {one['true_positives']:>5} {one['precision']:6.3f} {one['recall']:6.3f} {one['f1']:6.3f} {near['f1']:10.3f}")
    one, near = report["pooled"]["one-to-one"], report["pooled"]["nearest"]
    print(f"{'pooled':<32} {one['truths']:>6} {one['picks']:>6} {one['true_positives']:>5} {one['precision']:6.3f} {one['recall']:6.3f} {one['f1']:6.3f} {near['f1']:10.3f}")
    print(f"mean IoU over ground truth (one-to-one): {one['mean_iou']:.3f}")
    if report["without_picks"]:
        print(f"{len(report['without_picks'])} micrographs with truth but no picks: {', '.join(report['without_picks'][:5])}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emmae-eval", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picks", type=Path, required=True, metavar="DIR", help="folder of pick files (e.g. an emmae-pick output folder)")
    parser.add_argument("--truth", type=Path, required=True, metavar="DIR", help="folder of ground-truth files, one per micrograph")
    parser.add_argument("--picks-format", choices=FORMATS, default="star", help="which pick files to score (default: star)")
    parser.add_argument("--truth-format", choices=FORMATS, help="which truth files to read (default: each stem's first of star, csv, box, cbox)")
    parser.add_argument("--diameter-px", type=float, metavar="PX", help="particle diameter (the metric's box size) in pixels")
    parser.add_argument("--diameter-A", type=float, metavar="A",
                        help="particle diameter in Angstrom, with --pixel-size-A or the pixel sizes in the picks folder's micrographs.star")
    parser.add_argument("--pixel-size-A", type=float, metavar="A", help="pixel size in Angstrom, for --diameter-A")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    add_common_arguments(parser, device=False, threads=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    try:
        report = evaluate(args.picks, args.truth, args.diameter_px, picks_format=args.picks_format, truth_format=args.truth_format,
                          diameter_A=args.diameter_A, pixel_size_A=args.pixel_size_A)
        print_report(report)
        if args.json:
            write_bytes_atomic(args.json, json.dumps(report, indent=2).encode())
    except (OSError, CoordinateFileError, EvaluationError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
