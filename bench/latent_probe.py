"""How much particle signal the bundle's latents carry: a supervised read-out as a reference point.

    python bench/latent_probe.py [--bundle model.onnx] [--data ../shared/data/real]

For each real dataset a logistic regression is fitted, with the expert labels of
the *train* split, on the smoothed latents (target: the latent lies within 0.3
diameters of a labelled centre). On the *test* split its score map is upsampled to
the grid and picked like the LoG baseline of ``bench/quality.py`` (scale-matched
blob maxima, Otsu threshold, the same suppression and border). The label-free
the picker (each micrograph its own session) is scored on the same micrographs. The read-out uses labels the
picker never sees, so its F1 shows roughly how far any label-free rule on these
latents can go; a gap that stays small means the encoder, not the clustering or the
post-processing, limits the quality. Writes ``bench/results/latent-probe.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from sklearn.linear_model import LogisticRegression

from emmae.config import EmmaeConfig
from emmae.metrics import score_micrograph
from emmae.runtime.picking.cluster import smooth_latents, smoothing_window
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import Encoded, Prepared, fit, pick, prepare
from quality import DEFAULT_DATA, RESULTS, log_picks, open_for_real_data, pooled, split_items

log = logging.getLogger("bench.latent_probe")
NEAR_CENTRE = 0.3  # diameters: latents this close to a labelled centre are "particle"


def encoded(encoder: Encoder, path: Path, config: EmmaeConfig) -> tuple[np.ndarray, Prepared]:
    """Latent map ``[h, w, D]`` of one micrograph, and its prepared form."""
    prepared = prepare(path, config, encoder)
    return np.asarray(encoder.encode(prepared.grid.image)), prepared


def features(latents: np.ndarray, prepared: Prepared, patch_px: int) -> np.ndarray:
    """The read-out's inputs ``[h * w, D]``: the latents smoothed as the picker smooths them."""
    window = smoothing_window(prepared.grid.diameter_grid_px, patch_px)
    return np.asarray(smooth_latents(latents, window)).reshape(-1, latents.shape[-1])


def near_centres(shape: tuple[int, int], patch_px: int, centres_grid: np.ndarray, radius_grid_px: float) -> np.ndarray:
    """Boolean ``[h, w]``: latents whose centre lies within ``radius_grid_px`` of a labelled centre (grid pixels)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xy = np.stack([(cols.ravel() + 0.5) * patch_px - 0.5, (rows.ravel() + 0.5) * patch_px - 0.5], axis=1)
    distance, _ = cKDTree(centres_grid).query(xy)
    return (distance < radius_grid_px).reshape(shape)


def fit_read_out(encoder: Encoder, folder: Path) -> LogisticRegression:
    """Logistic regression of "near a labelled centre" on the train split's smoothed latents (every third one)."""
    patch = encoder.bundle.info.patch_px
    inputs, targets = [], []
    for path, truth, config in split_items(folder, "train"):
        latents, prepared = encoded(encoder, path, config)
        grid = prepared.grid
        centres = grid.transform.input_to_grid(truth)
        near = near_centres(latents.shape[:2], patch, centres, NEAR_CENTRE * grid.diameter_grid_px)
        inputs.append(features(latents, prepared, patch)[::3])
        targets.append(near.ravel()[::3])
    return LogisticRegression(C=0.1, max_iter=500).fit(np.concatenate(inputs), np.concatenate(targets))


def read_out_picks(model: LogisticRegression, latents: np.ndarray, prepared: Prepared, patch_px: int) -> np.ndarray:
    """Picks (input pixels) from the read-out's score map, as the LoG baseline picks a dark-blob image."""
    grid = prepared.grid
    score_map = model.decision_function(features(latents, prepared, patch_px)).reshape(latents.shape[:2]).astype(np.float32)
    grid_map = np.repeat(np.repeat(score_map, patch_px, axis=0), patch_px, axis=1)
    h, w = grid.transform.valid_shape
    return grid.transform.grid_to_input(log_picks(-grid_map[:h, :w], grid.diameter_grid_px))


def dataset_rows(encoder: Encoder, folder: Path) -> list[dict]:
    """Pooled test-split scores of the label-free picker and of the supervised read-out."""
    model = fit_read_out(encoder, folder)
    picker, read_out = [], []
    for path, truth, config in split_items(folder, "test"):
        latents, prepared = encoded(encoder, path, config)  # once, for the picker and the read-out
        alone = Encoded(prepared, latents)  # each micrograph its own session, as measured before
        picker.append(score_micrograph(pick(alone, config, encoder, fit([alone], config, encoder)).xy, truth, prepared.diameter_px))
        found = read_out_picks(model, latents, prepared, encoder.bundle.info.patch_px)
        read_out.append(score_micrograph(found, truth, prepared.diameter_px))
    return [
        {"dataset": folder.name, "method": "cryo-emmae (label-free)", **pooled(picker).to_dict()},
        {"dataset": folder.name, "method": "supervised latent read-out", **pooled(read_out).to_dict()},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--output", type=Path, default=RESULTS / "latent-probe.json")
    args = parser.parse_args(argv)
    encoder = open_for_real_data(args.bundle, args.data)
    if encoder is None:
        return 2
    rows = [row for manifest in sorted(args.data.glob("*/manifest.json")) for row in dataset_rows(encoder, manifest.parent)]
    print(f"{'dataset':<14} {'method':<27} {'F1':>6} {'precision':>9} {'recall':>7}")
    for r in rows:
        print(f"{r['dataset']:<14} {r['method']:<27} {r['f1']:6.3f} {r['precision']:9.3f} {r['recall']:7.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"bundle": encoder.bundle.path.name, "train": "train", "test": "test", "results": rows}, indent=2) + "\n")
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
