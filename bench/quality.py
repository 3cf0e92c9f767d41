"""Picking quality on the real test splits: the bundled model against a Laplacian-of-Gaussian baseline.

    python bench/quality.py [--bundle model.onnx] [--data ../shared/data/real] [--split test]

For each dataset: one-to-one F1, precision and recall (the paper's metric, boxes of
the particle diameter, IoU > 0.6), pooled over the split's micrographs, for
(a) ``pick_micrograph`` with the bundle and (b) a diameter-matched LoG blob picker
with a label-free threshold (Otsu over the response at local maxima). Topaz's
pretrained detector is not run: it needs a torch build beside the CPU one used here.
Writes ``bench/results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from emmae.config import EmmaeConfig
from emmae.io.mrc import read_micrograph
from emmae.io.truth import read_centres
from emmae.memory import retain_freed_memory
from emmae.metrics import Score, score_micrograph
from emmae.runtime.encoder import Encoder
from emmae.runtime.picker import pick_micrograph
from emmae.runtime.postprocess import Candidates, drop_border, suppress_neighbours

log = logging.getLogger("bench.quality")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample (256 bins)."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, grand = weight[-1], mean[-1]
    between = (grand * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[np.argmax(between)])


def log_picks(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """Dark blobs of the particle's size: maxima of the scale-normalised LoG, Otsu-thresholded."""
    sigma = diameter_px / 2 / np.sqrt(2)
    response = sigma**2 * ndi.gaussian_laplace(image.astype(np.float32), sigma)  # dark blob -> positive
    size = max(3, int(diameter_px / 2))
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > 0)
    rows, cols = np.nonzero(peaks)
    values = response[rows, cols]
    if len(values) < 2:
        return np.zeros((0, 2))
    keep = values > otsu(values)
    found = Candidates(np.stack([cols[keep], rows[keep]], axis=1).astype(np.float64), values[keep])
    found = suppress_neighbours(found, diameter_px / 2)
    return drop_border(found, image.shape, diameter_px / 1.5).xy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/quality.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    if not args.data.is_dir():
        log.error("no real data at %s", args.data)
        return 2
    encoder = Encoder.open(args.bundle)
    results = []
    for manifest in sorted(args.data.glob("*/manifest.json")):
        entries = json.loads(manifest.read_text())["micrographs"]
        totals = {"cryo-emmae": Score(0, 0, 0, 0.0), "LoG baseline": Score(0, 0, 0, 0.0)}
        seconds = []
        for name, entry in sorted(entries.items()):
            if entry["split"] != args.split:
                continue
            diameter = float(entry["diam_px_est"])
            path = manifest.parent / "micrographs" / f"{name}.mrc"
            truth = read_centres(manifest.parent / "coordinates" / f"{name}.star")
            config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}})
            start = time.perf_counter()
            picked = pick_micrograph(path, config, encoder)
            seconds.append(time.perf_counter() - start)
            totals["cryo-emmae"] += score_micrograph(picked.xy, truth, diameter)
            totals["LoG baseline"] += score_micrograph(log_picks(read_micrograph(path).data, diameter), truth, diameter)
        for method, score in totals.items():
            results.append({"dataset": manifest.parent.name, "method": method, **score.to_dict()})
        log.info("%s: %d micrographs, median %.2f s per pick", manifest.parent.name, len(seconds), float(np.median(seconds)))
    print(f"{'dataset':<14} {'method':<14} {'F1':>6} {'precision':>9} {'recall':>7} {'picks':>6} {'truth':>6}")
    for r in results:
        print(f"{r['dataset']:<14} {r['method']:<14} {r['f1']:6.3f} {r['precision']:9.3f} {r['recall']:7.3f} {r['picks']:6d} {r['truths']:6d}")
    mean_f1 = float(np.mean([r["f1"] for r in results if r["method"] == "cryo-emmae"]))
    print(f"cryo-emmae mean F1 over datasets: {mean_f1:.3f}")
    out = args.output or RESULTS / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(encoder.bundle.path.name), "split": args.split, "mean_f1": mean_f1, "results": results}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
