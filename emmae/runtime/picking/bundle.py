"""Load and check a model bundle with onnxruntime alone (no torch, no onnx package).

A bundle is one ONNX file: the encoder graph (``tiles [N, 1, t, t]`` -> ``latents
[N, L, D]``) plus JSON metadata (:class:`BundleInfo`). The default model ships in
the package (``emmae/models/default.onnx``).
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emmae.errors import BundleError

BUNDLE_FORMAT = 1
METADATA_KEY = "emmae"
DEFAULT_BUNDLE = "default.onnx"


@dataclass(frozen=True)
class BundleInfo:
    """What the runtime needs besides the graph."""

    arch: dict[str, Any]
    standardisation: dict[str, float]  # {"mean": ..., "std": ...} of tiles in [0, 1]
    centroids: list[list[float]]  # train-set k-means centroids [k, D]
    particle_cluster: int
    particle_cluster_method: str
    preprocess: dict[str, Any]  # the PreprocessConfig fields the model was trained with
    precision: str = "fp32"
    provenance: dict[str, Any] = field(default_factory=dict)
    emmae_version: str = ""
    format_version: int = BUNDLE_FORMAT

    @property
    def tile_px(self) -> int:
        return int(self.arch["tile_px"])

    @property
    def patch_px(self) -> int:
        return int(self.arch["patch_px"])

    @property
    def embed_dim(self) -> int:
        return int(self.arch["embed_dim"])

    def flops_per_tile(self) -> float:
        """Multiply-adds x 2 of one tile through the encoder (linear layers and attention)."""
        return encoder_flops(self.arch)

    def centroid_array(self) -> np.ndarray:
        return np.asarray(self.centroids, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str, source: str) -> BundleInfo:
        """Parse and check the metadata. Raises :class:`BundleError`."""
        try:
            data = json.loads(text)
            version = int(data.get("format_version", 0))
        except (ValueError, AttributeError, TypeError) as exc:
            raise BundleError(f"{source}: unreadable bundle metadata ({exc})") from None
        if version != BUNDLE_FORMAT:
            raise BundleError(f"{source}: bundle format {version} is not supported (this version reads {BUNDLE_FORMAT})")
        try:
            info = cls(**data)
        except TypeError as exc:
            raise BundleError(f"{source}: incomplete bundle metadata ({exc})") from None
        _check(info, source)
        return info


def encoder_flops(arch: dict[str, Any]) -> float:
    """FLOPs (2 per multiply-add) of the ViT encoder on one tile: ~2.83e9 for the reference size."""
    tokens = (arch["tile_px"] // arch["patch_px"]) ** 2
    t, d = tokens + 1, arch["embed_dim"]
    hidden = int(d * arch["mlp_ratio"])
    patch_embed = 2 * tokens * arch["patch_px"] ** 2 * d
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    return float(patch_embed + arch["depth"] * per_block)


def _check(info: BundleInfo, source: str) -> None:
    centroids = info.centroid_array()
    if centroids.ndim != 2 or centroids.shape[1] != info.embed_dim:
        raise BundleError(f"{source}: centroids {centroids.shape} do not match embed_dim {info.embed_dim}")
    if not 0 <= info.particle_cluster < centroids.shape[0]:
        raise BundleError(f"{source}: particle cluster {info.particle_cluster} outside 0..{centroids.shape[0] - 1}")
    if not info.standardisation.get("std", 0) > 0:
        raise BundleError(f"{source}: invalid standardisation {info.standardisation}")


def default_bundle_path() -> Path:
    """The bundled default model inside the installed package."""
    return Path(str(importlib.resources.files("emmae.models").joinpath(DEFAULT_BUNDLE)))


@dataclass(frozen=True)
class ModelBundle:
    """An opened bundle: its path, metadata and onnxruntime session."""

    path: Path
    info: BundleInfo
    session: Any  # onnxruntime.InferenceSession

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return list(self.session.get_providers())

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Latents ``[N, L, D]`` of tiles ``[N, 1, t, t]`` in [0, 1] (standardised here), on the CPU."""
        mean, std = self.info.standardisation["mean"], self.info.standardisation["std"]
        feed = ((np.asarray(tiles, dtype=np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)
        return self.session.run(None, {self.session.get_inputs()[0].name: feed})[0]


def open_bundle(path: str | Path | None = None, providers: list[str] | None = None, threads: int | None = None) -> ModelBundle:
    """Open a bundle (the default model when ``path`` is None) with onnxruntime.

    ``threads``: CPU threads of the session (default: onnxruntime's, one per core).

    Raises:
        BundleError: the file is missing, not an ONNX model, has no or incompatible
            metadata, or its graph does not take ``[N, 1, t, t]`` tiles.
    """
    import onnxruntime as ort

    path = default_bundle_path() if path is None else Path(path)
    if not path.is_file():
        raise BundleError(f"model bundle not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise BundleError(f"{path}: an ONNX model without cryo-EMMAE metadata (not a model bundle)")
    info = BundleInfo.from_json(meta[METADATA_KEY], str(path))
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[1:] != [1, info.tile_px, info.tile_px]:
        raise BundleError(f"{path}: encoder input {shape} does not match [N, 1, {info.tile_px}, {info.tile_px}]")
    return ModelBundle(path=path, info=info, session=session)
