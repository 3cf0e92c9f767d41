"""Fine-tuning from a bundle: continue the masked-autoencoder training on new micrographs.

A bundle's weights file (:mod:`emmae.trainer.weights`) gives the encoder and the
decoder; the bundle gives the architecture and the preprocessing it was trained
with. A fine-tuning keeps both, fits the standardisation to the new micrographs
(the session's own contrast), and runs a short schedule at a small learning rate.
The exported result names its parent in its provenance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emmae.config import PreprocessConfig
from emmae.trainer.weights import Weights, bundle_weights
from emmae.runtime.picking.bundle import BundleInfo, default_bundle_path, open_bundle

# The schedule of a fine-tuning, where the command line does not say otherwise: a few
# epochs at a fifth of the from-scratch peak rate (measured: enough to move the loss
# on unseen micrographs without forgetting the parent's features).
FINETUNE_SETTINGS: dict[str, Any] = {"epochs": 5, "base_lr": 1e-4, "warmup_epochs": 1, "checkpoint_every": 1}


@dataclass(frozen=True)
class Parent:
    """The bundle a fine-tuning starts from, with its weights."""

    path: Path
    info: BundleInfo
    weights: Weights
    sha256: str

    def preprocess(self, diameters: PreprocessConfig) -> PreprocessConfig:
        """The parent's preprocessing, with the particle diameter (and pixel size) of ``diameters``."""
        fields = ("diameter_px", "diameter_A", "pixel_size_A")
        return PreprocessConfig(**{**self.info.preprocess, **{f: getattr(diameters, f) for f in fields}})

    def provenance(self) -> dict[str, Any]:
        """What the child's provenance says of its parent."""
        return {
            "bundle": self.path.name,
            "sha256": self.sha256,
            "trained_on": self.info.provenance.get("train", []),
            "parent": self.info.provenance.get("parent"),
        }


def open_parent(path: Path | None) -> Parent:
    """The bundle at ``path`` (None: the bundled default) and its fine-tuning weights.

    Raises:
        BundleError: the bundle cannot be opened, or has no (matching) weights file.
    """
    path = default_bundle_path() if path is None else Path(path)
    info = open_bundle(path).info
    weights = bundle_weights(path, info)
    return Parent(path, info, weights, hashlib.sha256(path.read_bytes()).hexdigest())
