"""How often the annotation-free particle-cluster choice agrees with the annotated one, on real data.

    python bench/clusters.py [--bundle model.onnx] [--data ../shared/data/real]

For every real micrograph: preprocess, embed with the bundle, label each latent
with the bundle's train-set centroids, then name the particle cluster (a) from that
micrograph's expert coordinates (enrichment inside the particle disks) and (b) from
the particle diameter alone (:func:`particle_cluster_by_prior`). Prints one row per
micrograph and the agreement rates; writes ``bench/results/clusters.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from emmae.config import PreprocessConfig
from emmae.io.mrc import read_micrograph
from emmae.io.truth import read_centres
from emmae.runtime.picking.bundle import open_bundle
from emmae.runtime.picking.preprocess import preprocess
from emmae.runtime.kernels.tiles import latent_map, to_tiles
from emmae.trainer.clusters import (
    disk_mask,
    label_map,
    particle_cluster_by_prior,
    particle_cluster_by_reference,
    smoothed_labels,
)

log = logging.getLogger("bench.clusters")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def micrograph_row(bundle, path: Path, coords: Path, diameter_px: float, split: str) -> dict:
    pre = PreprocessConfig(**bundle.info.preprocess)
    out = preprocess(read_micrograph(path).data, pre, diameter_px)
    tiles = to_tiles(out.image, pre.tile_px) / np.float32(255)
    latents = latent_map(bundle.embed(tiles), out.image.shape, bundle.info.patch_px)
    centroids = bundle.info.centroid_array()
    labels = label_map(latents, centroids)
    patch = bundle.info.patch_px
    latent_diameter = out.diameter_grid_px / patch
    centres = (out.transform.input_to_grid(read_centres(coords)) + 0.5) / patch - 0.5
    reference = particle_cluster_by_reference(labels, disk_mask(labels.shape, centres, latent_diameter), len(centroids))
    prior = particle_cluster_by_prior(smoothed_labels([latents], centroids, [latent_diameter], patch), [latent_diameter], len(centroids))
    return {
        "micrograph": path.stem, "split": split, "reference": reference.cluster, "prior": prior.cluster,
        "bundle": bundle.info.particle_cluster, "reference_scores": reference.scores, "prior_scores": prior.scores,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data.is_dir():
        log.error("no real data at %s", args.data)
        return 2
    bundle = open_bundle(args.bundle)
    rows = []
    for manifest in sorted(args.data.glob("*/manifest.json")):
        entries = json.loads(manifest.read_text())["micrographs"]
        for name, entry in sorted(entries.items()):
            folder = manifest.parent
            rows.append(micrograph_row(bundle, folder / "micrographs" / f"{name}.mrc", folder / "coordinates" / f"{name}.star", float(entry["diam_px_est"]), entry["split"]))
    print(f"{'micrograph':<30} {'split':<6} {'reference':>9} {'prior':>6} {'bundle':>7}")
    for r in rows:
        print(f"{r['micrograph']:<30} {r['split']:<6} {r['reference']:>9} {r['prior']:>6} {r['bundle']:>7}")
    agree_prior = float(np.mean([r["reference"] == r["prior"] for r in rows]))
    agree_bundle = float(np.mean([r["reference"] == r["bundle"] for r in rows]))
    print(f"per-micrograph prior == reference: {agree_prior:.0%}; bundle's cluster == reference: {agree_bundle:.0%} ({len(rows)} micrographs)")
    out = RESULTS / "clusters.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"bundle": str(bundle.path.name), "provenance_choices": bundle.info.provenance.get("particle_cluster_choices"),
               "agreement_prior_vs_reference": agree_prior, "agreement_bundle_vs_reference": agree_bundle, "micrographs": rows}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
