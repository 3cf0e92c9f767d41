"""emmae-export: turn a training checkpoint into a model bundle.

Exports the encoder to ONNX, embeds the training micrographs listed in the
checkpoint, fits the train-set k-means (k = 4), names the particle cluster and writes
one bundle per precision, plus the autoencoder's weights beside them
(<out stem>.mae.npz, for emmae-train --init). Exit status: 0 written, 2 bad
arguments or files.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emmae import __version__
from emmae.commandline import add_common_arguments, setup_logging
from emmae.config import PreprocessConfig
from emmae.errors import EmmaeError
from emmae.export.bundle import write_bundle
from emmae.export.onnx import export_fp32, export_variant
from emmae.trainer.weights import Weights, weights_path, write_weights
from emmae.io.coords import GridTransform
from emmae.io.mrc import read_layout, read_micrograph
from emmae.io.truth import read_centres
from emmae.runtime.picking.bundle import BundleInfo, open_bundle
from emmae.runtime.kernels.tiles import latent_map, to_tiles
from emmae.trainer.clusters import (
    ClusterChoice,
    disk_mask,
    fit_train_clusters,
    label_map,
    particle_cluster_by_prior,
    smoothed_labels,
    particle_cluster_by_reference,
)
from emmae.trainer.data import MicrographItem, cached_grid_image
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder
from emmae.trainer.train import load_checkpoint

log = logging.getLogger("emmae.export")
EXAMPLES = """examples:
  emmae-export runs/mae/checkpoint.pt --out model.onnx --precision fp32 fp16 int8
  emmae-export runs/mae/checkpoint.pt --out model.onnx --reference mic_0001.mrc --reference-coords mic_0001.star --cluster-method reference
"""

K_TRAIN = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-export", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt written by emmae-train")
    parser.add_argument("-o", "--out", type=Path, required=True, help="bundle path; other precisions get a -fp16/-int8 suffix")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=["fp32"],
                        help="one bundle per precision: fp32 (default), fp16, int8 (dynamic quantisation)")
    parser.add_argument("--reference", type=Path, help="an annotated micrograph to name the particle cluster")
    parser.add_argument("--reference-coords", type=Path, help="its particle centres (.star, .csv or .box)")
    parser.add_argument("--reference-diameter-px", type=float, help="particle diameter on the reference (default: its training diameter)")
    parser.add_argument("--cluster-method", choices=["prior", "reference"], default="prior",
                        help="name the particle cluster from the particle diameter alone (prior, default) or from the annotated --reference")
    parser.add_argument("--cache", type=Path, help="preprocessing cache (default: beside the checkpoint)")
    add_common_arguments(parser, device=False, threads=False)
    return parser


@dataclass(frozen=True)
class ExportRequest:
    """One export: what emmae-export's options say (:func:`request_from_args`), or what a caller such as emmae-adapt asks for."""

    checkpoint: Path  # checkpoint.pt written by emmae-train
    out: Path  # the first precision's bundle; the others get a -fp16/-int8 suffix
    precisions: tuple[str, ...] = ("fp32",)
    reference: Path | None = None  # an annotated micrograph to name the particle cluster
    reference_coords: Path | None = None  # its particle centres
    reference_diameter_px: float | None = None  # default: its training diameter
    cluster_method: str = "prior"  # "prior" (the diameter alone) or "reference"
    cache: Path | None = None  # preprocessing cache (default: beside the checkpoint)


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The export that :func:`build_parser`'s ``args`` ask for."""
    return ExportRequest(args.checkpoint, args.out, tuple(args.precision), args.reference, args.reference_coords, args.reference_diameter_px,
                         args.cluster_method, args.cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    try:
        for path in export_bundles(request_from_args(args)):
            log.info("wrote %s", path)
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def load_mae(checkpoint: dict) -> MaskedAutoencoder:
    mae = MaskedAutoencoder(MAEArchitecture(**checkpoint["arch"]))
    mae.load_state_dict(checkpoint["model"])
    return mae.eval()


def read_checkpoint(path: Path) -> dict:
    """An emmae-train checkpoint.

    Raises:
        FileNotFoundError: no such file; EmmaeError: not a checkpoint emmae-train wrote (one line, with the fix).
    """
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise EmmaeError(f"{path} is not a checkpoint torch can read ({type(exc).__name__}): give the checkpoint.pt that emmae-train "
                         "wrote in its --out folder") from None
    missing = [key for key in ("arch", "model", "extra", "standardisation") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise EmmaeError(f"{path} is not an emmae-train checkpoint (no {', '.join(missing)}): give the checkpoint.pt that emmae-train "
                         "wrote in its --out folder")
    return checkpoint


def export_bundles(request: ExportRequest) -> list[Path]:
    """The bundles of ``request.checkpoint`` (one per precision, the first at ``request.out``) and the weights beside them.
    Returns the files written. Raises EmmaeError, FileNotFoundError, ValueError."""
    checkpoint = read_checkpoint(request.checkpoint)
    mae = load_mae(checkpoint)
    pre = PreprocessConfig(**checkpoint["extra"]["preprocess"])
    cache = request.cache or request.checkpoint.parent / "cache"
    with tempfile.TemporaryDirectory() as work:
        fp32 = export_fp32(mae, Path(work) / "encoder.onnx")
        probe = write_bundle(fp32, _info(checkpoint, pre, np.zeros((1, mae.arch.embed_dim)), ClusterChoice(0, [0.0], "none"), "fp32", request), Path(work) / "probe.onnx")
        bundle = open_bundle(probe)
        items = [MicrographItem(Path(p), float(d)) for p, d in checkpoint["extra"]["train"]]
        maps = [_latent_map(bundle, cached_grid_image(item, pre, cache), pre) for item in items]
        fit = fit_train_clusters(maps, K_TRAIN, seed=0)
        centroids = np.asarray(fit.centroids)
        latent_diameters = [i.diameter_px * _grid_scale(i.path, pre) / mae.arch.patch_px for i in items]
        prior = particle_cluster_by_prior(smoothed_labels(maps, centroids, latent_diameters, mae.arch.patch_px), latent_diameters, K_TRAIN)
        choice = prior
        reference = _reference_choice(request, bundle, centroids, pre, items) if request.reference else None
        if request.cluster_method == "reference":
            if reference is None:
                raise ValueError("--cluster-method reference needs --reference and --reference-coords")
            choice = reference
        log.info("particle cluster by prior: %d %s", prior.cluster, np.round(prior.scores, 3).tolist())
        if reference is not None:
            log.info("particle cluster by reference: %d %s (agree: %s)", reference.cluster, np.round(reference.scores, 3).tolist(), reference.cluster == prior.cluster)
        extra = {"prior": prior.__dict__, "reference": None if reference is None else reference.__dict__}
        weights = weights_path(request.out)
        digest = write_weights(weights, Weights({k: v.detach().cpu().numpy() for k, v in mae.state_dict().items()},
                                                dict(checkpoint["arch"]), dict(checkpoint["standardisation"])))
        written = [weights]
        for precision in request.precisions:
            path = request.out if precision == request.precisions[0] else request.out.with_name(f"{request.out.stem}-{precision}{request.out.suffix}")
            graph = export_variant(mae, Path(work) / f"graph-{precision}.onnx", precision, Path(work))
            info = _info(checkpoint, pre, centroids, choice, precision, request, extra, {"file": weights.name, "sha256": digest})
            written.append(write_bundle(graph, info, path))
        return written


def _grid_scale(path: Path, pre: PreprocessConfig) -> float:
    """Grid pixels per micrograph pixel (from the header's shape)."""
    layout = read_layout(path)
    return GridTransform.fit((layout.ny, layout.nx), pre.grid_px, pre.tile_px).scale


def _latent_map(bundle, grid_image: np.ndarray, pre: PreprocessConfig) -> np.ndarray:
    tiles = to_tiles(grid_image, pre.tile_px) / np.float32(255)
    return latent_map(bundle.embed(tiles), grid_image.shape, bundle.info.patch_px)


def _reference_choice(request: ExportRequest, bundle, centroids: np.ndarray, pre: PreprocessConfig, items: list[MicrographItem]) -> ClusterChoice:
    if request.reference_coords is None:
        raise ValueError("--reference needs --reference-coords")
    diameter = request.reference_diameter_px or next((i.diameter_px for i in items), None)
    if diameter is None:
        raise ValueError("--reference-diameter-px is needed")
    item = MicrographItem(request.reference, diameter)
    grid_image = cached_grid_image(item, pre, None)
    labels = label_map(_latent_map(bundle, grid_image, pre), centroids)
    transform = GridTransform.fit(read_micrograph(request.reference).shape, pre.grid_px, pre.tile_px)
    patch = bundle.info.patch_px
    centres = (transform.input_to_grid(read_centres(request.reference_coords)) + 0.5) / patch - 0.5
    mask = disk_mask(labels.shape, centres, diameter * transform.scale / patch)
    return particle_cluster_by_reference(labels, mask, len(centroids))


def _info(checkpoint: dict, pre: PreprocessConfig, centroids: np.ndarray, choice: ClusterChoice, precision: str, request: ExportRequest,
          extra: dict | None = None, weights: dict | None = None) -> BundleInfo:
    history = checkpoint["history"]
    last = history[-1] if history else {}
    digest = hashlib.sha256(Path(request.checkpoint).read_bytes()).hexdigest()
    provenance = {
        "train": [Path(p).name for p, _ in checkpoint["extra"]["train"]],
        "valid": [Path(p).name for p, _ in checkpoint["extra"]["valid"]],
        "epochs": int(checkpoint["epoch"]),
        "settings": checkpoint["settings"],
        "final_train_loss": last.get("train_loss"),
        "final_valid_loss": last.get("valid_loss"),
        # the loss curve: one entry per epoch (a resumed run's earlier epochs included)
        "loss_curve": [{"epoch": i + 1, **{key: record[key] for key in ("train_loss", "valid_loss", "lr") if key in record}} for i, record in enumerate(history)],
        "checkpoint_sha256": digest,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "particle_cluster_choices": extra or {},
        "weights": weights,
        "parent": checkpoint["extra"].get("parent"),  # the bundle a fine-tuning started from (None: trained from scratch)
    }
    # what another trainer recorded (bench/gpu_train_import.py: the device, micrograph-epochs, its own loss curve)
    provenance |= checkpoint["extra"].get("provenance") or {}
    return BundleInfo(
        arch=dict(checkpoint["arch"]),
        standardisation=dict(checkpoint["standardisation"]),
        centroids=np.asarray(centroids, dtype=np.float64).round(7).tolist(),
        particle_cluster=choice.cluster,
        particle_cluster_method=choice.method,
        preprocess=pre.model_dump(mode="json"),
        precision=precision,
        provenance=provenance,
        emmae_version=__version__,
    )


if __name__ == "__main__":
    sys.exit(main())
