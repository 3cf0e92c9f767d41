"""One hash of what ``emmae-pick`` writes for the real dev datasets, to show a change left the picks alone.

    python bench/pick_hash.py [--data ../shared/data/real] [--output bench/results/pick-hash.json] [-- EMMAE-PICK OPTIONS]

Each dataset (every split) is picked as one ``emmae-pick`` run with the bundled model at the
median of its estimated diameters (``manifest.json``'s ``diam_px_est``), as a user would; every micrograph's
``<stem>_autopick.star`` is read back with ``starfile`` and its coordinates and figures of merit,
rounded to 1e-3 px and 1e-4, are hashed (SHA-256) in name order. Run it before and after a
change that should not change behaviour: the hashes must be equal. Each dataset's picks are also
scored against its expert labels (``coordinates/<name>.star``; one-to-one, the paper's metric,
pooled over every labelled micrograph), so a change that is allowed to move picks a little (a
quantised model: ``-- --model emmae/models/default-int8.onnx``) shows what it costs. Options after
``--`` go to every ``emmae-pick`` run. Prints one line per dataset and writes the JSON (hashes,
F1, pick counts, seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile

from emmae.io.truth import read_centres
from emmae.metrics import Score, score_micrograph

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real"
log = logging.getLogger("bench.pick_hash")
PICK = "import sys; from emmae.runtime.commands.pick import main; sys.exit(main(sys.argv[1:]))"


def diameter_px(dataset: Path) -> float:
    """The dataset's estimated diameter (px): the median of its micrographs' (they differ by a few tenths in EMPIAR-10059)."""
    entries = json.loads((dataset / "manifest.json").read_text())["micrographs"]
    return round(float(np.median([float(entry["diam_px_est"]) for entry in entries.values()])), 1)


def picks_digest(out: Path) -> tuple[str, int]:
    """SHA-256 over every ``*_autopick.star`` below ``out`` (name order) and the number of picks."""
    digest, count = hashlib.sha256(), 0
    for star in sorted(out.rglob("*_autopick.star")):
        table = starfile.read(star, always_dict=True)
        frame = next(iter(table.values()))
        rows = np.round(frame[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), 3)
        merit = np.round(frame["rlnAutopickFigureOfMerit"].to_numpy(float), 4) if "rlnAutopickFigureOfMerit" in frame else np.zeros(len(frame))
        digest.update(star.name.encode())
        digest.update(np.ascontiguousarray(np.column_stack([rows, merit])).tobytes())
        count += len(frame)
    return digest.hexdigest(), count


def labelled_f1(dataset: Path, out: Path, diameter: float) -> float:
    """Pooled one-to-one F1 of the picks in ``out`` against the dataset's expert labels."""
    total = Score(0, 0, 0, 0.0)
    for truth in sorted((dataset / "coordinates").glob("*.star")):
        picked = next(out.rglob(f"{truth.stem}_autopick.star"), None)
        xy = np.zeros((0, 2)) if picked is None else next(iter(starfile.read(picked, always_dict=True).values()))[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        total += score_micrograph(xy, read_centres(truth), diameter)
    return total.f1


def hash_dataset(dataset: Path, workdir: Path, extra: list[str]) -> dict:
    out, diameter = workdir / dataset.name, diameter_px(dataset)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PICK, str(dataset / "micrographs"), "-o", str(out), "--diameter-px", str(diameter), "-q", *extra],
                   check=True, cwd=workdir)
    seconds = time.perf_counter() - start
    digest, count = picks_digest(out)
    return {"dataset": dataset.name, "sha256": digest, "picks": count, "f1": round(labelled_f1(dataset, out, diameter), 4), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "pick-hash.json")
    parser.add_argument("pick_options", nargs="*", help="after --: options for every emmae-pick run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    datasets = sorted(p for p in args.data.glob("EMPIAR-*") if (p / "manifest.json").is_file())
    if not datasets:
        log.error("no datasets under %s: give --data", args.data)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [hash_dataset(dataset, Path(workdir), args.pick_options) for dataset in datasets]
    for row in rows:
        log.info("%-14s %6d picks  F1 %.4f  %6.1f s  %s", row["dataset"], row["picks"], row["f1"], row["seconds"], row["sha256"][:16])
    combined = hashlib.sha256("".join(r["sha256"] for r in rows).encode()).hexdigest()
    log.info("all: %s", combined)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"commit": commit, "pick_options": args.pick_options, "sha256": combined, "datasets": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
