"""``emmae-eval``: score picks against ground truth with the paper's metric.

    emmae-eval --picks emmae_picks --truth coordinates/ --diameter-px 56 [--json scores.json]

Pick files are matched to truth files by micrograph stem (``<stem>_autopick.star``,
``<stem>.star``, ``<stem>.box`` or ``<stem>.csv`` on either side). Prints one row per
micrograph and the pooled scores, for the one-to-one metric (headline) and the
reference code's nearest-match variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emmae.io.atomic import write_bytes_atomic
from emmae.io.truth import CoordinateFileError, read_centres
from emmae.metrics import Score, score_micrograph

log = logging.getLogger("emmae.eval")
SUFFIXES = (".star", ".box", ".csv")
PICK_TAGS = ("_autopick",)


def coordinate_files(folder: Path) -> dict[str, Path]:
    """Stem -> coordinate file of every ``.star``/``.box``/``.csv`` in ``folder`` (``_autopick`` stripped)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES or path.name in ("autopick.star", "particles.star"):
            continue
        stem = path.stem
        for tag in PICK_TAGS:
            stem = stem.removesuffix(tag)
        found.setdefault(stem, path)
    return found


def evaluate(picks: Path, truth: Path, diameter_px: float) -> dict:
    """Per-micrograph and pooled scores for both matching modes."""
    pick_files, truth_files = coordinate_files(picks), coordinate_files(truth)
    common = sorted(set(pick_files) & set(truth_files))
    if not common:
        raise FileNotFoundError(f"no micrograph has both picks in {picks} and truth in {truth}")
    rows, pooled = [], {"one-to-one": Score(0, 0, 0, 0.0), "nearest": Score(0, 0, 0, 0.0)}
    for stem in common:
        picked, expected = read_centres(pick_files[stem]), read_centres(truth_files[stem])
        row = {"micrograph": stem}
        for mode in pooled:
            score = score_micrograph(picked, expected, diameter_px, mode)
            pooled[mode] = pooled[mode] + score
            row[mode] = score.to_dict()
        rows.append(row)
    missing = sorted(set(truth_files) - set(pick_files))
    return {"diameter_px": diameter_px, "micrographs": rows, "pooled": {m: s.to_dict() for m, s in pooled.items()}, "without_picks": missing}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emmae-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picks", type=Path, required=True, help="folder of pick files")
    parser.add_argument("--truth", type=Path, required=True, help="folder of ground-truth files")
    parser.add_argument("--diameter-px", type=float, required=True, help="particle diameter (box size of the metric) in pixels")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = evaluate(args.picks, args.truth, args.diameter_px)
    except (FileNotFoundError, CoordinateFileError, NotADirectoryError) as exc:
        log.error("%s", exc)
        return 2
    print_report(report)
    if args.json:
        write_bytes_atomic(args.json, json.dumps(report, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
