"""Picking quality on the real test splits: the bundled model against a Laplacian-of-Gaussian baseline.

    python bench/quality.py [--bundle model.onnx] [--data ../shared/data/real] [--split test] [--topaz PATH]

For each dataset: one-to-one F1, precision and recall (the paper's metric, boxes of
the particle diameter, IoU > 0.6), pooled over the split's micrographs, for
(a) the picker with the bundle (each micrograph its own session) and (b) a diameter-matched LoG blob picker
with a label-free threshold (Otsu over the response at local maxima). With ``--topaz``
it also scores (c) Topaz's pretrained resnet16 detector, run from its own venv so its
torch stays apart from this one's:

    python3 -m venv /tmp/topaz-venv && . /tmp/topaz-venv/bin/activate
    pip install torch==2.13.0 && pip install --no-deps topaz-em
    pip install numpy pandas pillow scipy scikit-learn tqdm h5py psutil future
    python bench/quality.py --topaz /tmp/topaz-venv/bin/topaz

(no torchvision: the ``topaz`` entry point imports it for training, so ``topaz
preprocess`` and ``topaz extract`` run as ``python -m topaz.commands.*`` with the venv's
python). Micrographs are downsampled to a ~30 px particle (the best of scales 1, 2, 4
on train+valid), extracted with radius = half that diameter and threshold score > 0
(p > 0.5), coordinates scaled back up.
Each baseline row also carries a paired bootstrap over the split's micrographs
(``--resamples``, seed 0) of the pooled F1 difference, cryo-emmae minus that baseline:
its median, 95 % interval and the share of resamples the model wins, so that a gap
between two methods on five micrographs is read against its spread.
Writes ``bench/results/quality.json`` (``--split test``) or ``quality-<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from emmae.config import EmmaeConfig
from emmae.io.mrc import read_micrograph
from emmae.io.truth import read_centres
from emmae.memory import retain_freed_memory
from emmae.metrics import Score, score_micrograph
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import encode, fit, pick, prepare
from emmae.runtime.picking.localise import otsu_threshold as otsu
from emmae.runtime.picking.postprocess import Candidates, drop_border, suppress_neighbours

log = logging.getLogger("bench.quality")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def log_peaks(image: np.ndarray, diameter_px: float) -> Candidates:
    """Maxima of the scale-normalised LoG at the particle's size (dark blob -> positive), with their responses."""
    sigma = diameter_px / 2 / np.sqrt(2)
    response = sigma**2 * ndi.gaussian_laplace(image.astype(np.float32), sigma)
    size = max(3, int(diameter_px / 2))
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > 0)
    rows, cols = np.nonzero(peaks)
    return Candidates(np.stack([cols, rows], axis=1).astype(np.float64), response[rows, cols])


def log_picks(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """Dark blobs of the particle's size: :func:`log_peaks` above Otsu's threshold of their responses."""
    found = log_peaks(image, diameter_px)
    if len(found) < 2:
        return np.zeros((0, 2))
    found = found.take(np.flatnonzero(found.score > otsu(found.score)))
    found = suppress_neighbours(found, diameter_px / 2)
    return drop_border(found, image.shape, diameter_px / 1.5).xy


def split_items(folder: Path, split: str) -> list[tuple[Path, np.ndarray, EmmaeConfig]]:
    """(micrograph, expert centres, config with its diameter) of one split of a real dataset, by name.

    Micrographs without labels (no ``coordinates/<name>.star``) are left out.
    """
    entries = json.loads((folder / "manifest.json").read_text())["micrographs"]
    return [
        (folder / "micrographs" / f"{name}.mrc", read_centres(folder / "coordinates" / f"{name}.star"),
         EmmaeConfig.model_validate({"preprocess": {"diameter_px": float(entry["diam_px_est"])}}))
        for name, entry in sorted(entries.items())
        if entry["split"] == split and (folder / "coordinates" / f"{name}.star").is_file()
    ]


def pooled(scores: list[Score]) -> Score:
    total = Score(0, 0, 0, 0.0)
    for score in scores:
        total += score
    return total


def bootstrap_difference(model: list[Score], other: list[Score], resamples: int, seed: int = 0) -> dict:
    """Paired bootstrap over micrographs of pooled F1 (``model`` minus ``other``, same micrograph order)."""
    rng = np.random.default_rng(seed)
    n = len(model)
    draws = np.array([pooled([model[i] for i in pick]).f1 - pooled([other[i] for i in pick]).f1 for pick in rng.integers(0, n, size=(resamples, n))])
    low, median, high = np.quantile(draws, [0.025, 0.5, 0.975])
    return {"f1_difference": pooled(model).f1 - pooled(other).f1, "median": float(median), "interval_95": [float(low), float(high)],
            "model_wins": float(np.mean(draws > 0)), "resamples": resamples, "micrographs": n}


def topaz_picks(topaz: Path, paths: list[Path], diameter_px: float) -> dict[str, np.ndarray]:
    """Topaz's pretrained detector on ``paths``: centres (x = column, y = row) per micrograph stem."""
    python, scale = str(topaz.parent / "python"), max(1, round(diameter_px / 30))
    with tempfile.TemporaryDirectory() as tmp:
        run = ["-o", f"{tmp}/picks.txt", "-r", str(round(diameter_px / 2 / scale)), "-x", str(scale), "-t", "0"]
        subprocess.run([python, "-m", "topaz.commands.preprocess", "-s", str(scale), "-o", tmp, *map(str, paths)], check=True, capture_output=True)
        subprocess.run([python, "-m", "topaz.commands.extract", *run, *(f"{tmp}/{p.name}" for p in paths)], check=True, capture_output=True)
        table = pd.read_csv(f"{tmp}/picks.txt", sep="\t")
    return {name: rows[["x_coord", "y_coord"]].to_numpy(np.float64) for name, rows in table.groupby("image_name")}


def open_for_real_data(bundle: Path | None, data: Path) -> Encoder | None:
    """Logging, the allocator setting and the bundle's encoder; None (logged) when ``data`` is absent."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    if not data.is_dir():
        log.error("no real data at %s", data)
        return None
    return Encoder.open(bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/quality.json)")
    parser.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples of the micrographs (default 2000)")
    parser.add_argument("--topaz", type=Path, help="`topaz` script of a venv with topaz-em: adds a Topaz (pretrained) row")
    args = parser.parse_args(argv)
    encoder = open_for_real_data(args.bundle, args.data)
    if encoder is None:
        return 2
    results = []
    for manifest in sorted(args.data.glob("*/manifest.json")):
        items = split_items(manifest.parent, args.split)
        scores: dict[str, list[Score]] = {"cryo-emmae": [], "LoG baseline": []}
        if args.topaz:
            diameter = float(np.median([config.preprocess.diameter_px for _, _, config in items]))
            topaz = topaz_picks(args.topaz, [path for path, _, _ in items], diameter)
            scores["Topaz (pretrained)"] = []
        seconds = []
        for path, truth, config in items:
            diameter = config.preprocess.diameter_px
            start = time.perf_counter()
            encoded = encode(prepare(path, config, encoder), encoder)
            picked = pick(encoded, config, encoder, fit([encoded], config, encoder))  # each micrograph its own session
            seconds.append(time.perf_counter() - start)
            scores["cryo-emmae"].append(score_micrograph(picked.xy, truth, diameter))
            scores["LoG baseline"].append(score_micrograph(log_picks(read_micrograph(path).data, diameter), truth, diameter))
            if args.topaz:
                scores["Topaz (pretrained)"].append(score_micrograph(topaz.get(path.stem, np.zeros((0, 2))), truth, diameter))
        for method, per_micrograph in scores.items():
            row = {"dataset": manifest.parent.name, "method": method, **pooled(per_micrograph).to_dict()}
            if method != "cryo-emmae":
                row["model_minus_this"] = bootstrap_difference(scores["cryo-emmae"], per_micrograph, args.resamples)
            results.append(row)
        log.info("%s: %d micrographs, median %.2f s per pick", manifest.parent.name, len(seconds), float(np.median(seconds)))
    width = max([14, *(len(r["method"]) for r in results)])
    print(f"{'dataset':<14} {'method':<{width}} {'F1':>6} {'precision':>9} {'recall':>7} {'picks':>6} {'truth':>6}  model - this: F1 [95 %], wins")
    for r in results:
        gap = r.get("model_minus_this")
        spread = f"  {gap['f1_difference']:+.3f} [{gap['interval_95'][0]:+.3f}, {gap['interval_95'][1]:+.3f}], {gap['model_wins']:.0%}" if gap else ""
        print(f"{r['dataset']:<14} {r['method']:<{width}} {r['f1']:6.3f} {r['precision']:9.3f} {r['recall']:7.3f} {r['picks']:6d} {r['truths']:6d}{spread}")
    mean_f1 = float(np.mean([r["f1"] for r in results if r["method"] == "cryo-emmae"]))
    print(f"cryo-emmae mean F1 over datasets: {mean_f1:.3f}")
    out = args.output or RESULTS / ("quality.json" if args.split == "test" else f"quality-{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(encoder.bundle.path.name), "split": args.split, "mean_f1": mean_f1, "results": results}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
