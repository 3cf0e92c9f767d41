"""The fine-tuning weights that travel with a bundle: ``<bundle stem>.mae.npz`` beside it.

The ONNX bundle holds the encoder only; continuing the masked-autoencoder training
needs the decoder too. The weights file holds every parameter of the autoencoder
(encoder and decoder, float32, no optimiser state) and, under ``__meta__``, the
architecture and the standardisation it was trained with. Each bundle's provenance
names the file and its SHA-256 (``provenance["weights"]``), so the pair is checked
before a fine-tuning starts. Written and read with NumPy alone: the trainer reads them (a
fine-tuning's parent), the exporter writes them beside each bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emmae.errors import BundleError
from emmae.io.atomic import write_bytes_atomic
from emmae.runtime.picking.bundle import BundleInfo

SUFFIX = ".mae.npz"
META_KEY = "__meta__"


@dataclass(frozen=True)
class Weights:
    """The autoencoder's parameters (name -> float32 array) and what they were trained with."""

    state: dict[str, np.ndarray]
    arch: dict[str, Any]
    standardisation: dict[str, float]


def weights_path(bundle: Path) -> Path:
    """Where the weights of ``bundle`` are written: ``model.onnx`` -> ``model.mae.npz``."""
    return Path(bundle).with_suffix(SUFFIX)


def write_weights(path: Path, weights: Weights) -> str:
    """Write ``weights`` to ``path`` atomically; returns the file's SHA-256."""
    meta = json.dumps({"arch": weights.arch, "standardisation": weights.standardisation})
    buffer = io.BytesIO()
    arrays = {name: np.asarray(value, dtype=np.float32) for name, value in weights.state.items()}
    np.savez(buffer, **arrays, **{META_KEY: np.frombuffer(meta.encode(), dtype=np.uint8)})
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_weights(path: Path, expected_sha256: str | None = None) -> Weights:
    """Read a weights file, checking its SHA-256 when one is given.

    Raises:
        BundleError: missing, unreadable, not a weights file, or not the expected file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"fine-tuning weights {path}: {exc.strerror or exc}") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BundleError(f"{path} is not the weights file its bundle was exported with (SHA-256 differs)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(bytes(archive[META_KEY]).decode())
            state = {name: archive[name] for name in archive.files if name != META_KEY}
        return Weights(state, dict(meta["arch"]), dict(meta["standardisation"]))
    except (ValueError, KeyError, OSError) as exc:
        raise BundleError(f"{path} is not a fine-tuning weights file ({exc})") from None


def bundle_weights(bundle: Path, info: BundleInfo) -> Weights:
    """The weights that travel with ``bundle`` (named in its provenance, else ``<stem>.mae.npz`` beside it).

    Raises:
        BundleError: the bundle has no weights file (it was exported without one), or it does not match.
    """
    entry = info.provenance.get("weights") or {}
    path = Path(bundle).parent / entry["file"] if entry.get("file") else weights_path(bundle)
    if not path.is_file():
        raise BundleError(f"{bundle} has no fine-tuning weights ({path.name} is missing beside it): "
                          "re-export it from its checkpoint with emmae-export")
    weights = read_weights(path, entry.get("sha256"))
    if weights.arch != info.arch:
        raise BundleError(f"{path}: architecture {weights.arch} differs from the bundle's {info.arch}")
    return weights
