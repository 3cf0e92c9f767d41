"""Model bundles: one ONNX file holding the encoder and everything the runtime needs.

The metadata (JSON under the ``emmae`` key of the model's ``metadata_props``) holds
the standardisation, the train-set centroids and the particle cluster, the
architecture and tile geometry, the preprocessing settings the model was trained
with, the format version and the provenance. :mod:`emmae.runtime.picking.bundle` reads it
with onnxruntime alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from emmae.export.onnx import save_model
from emmae.runtime.picking.bundle import BUNDLE_FORMAT, METADATA_KEY, BundleInfo


def write_bundle(encoder_onnx: Path, info: BundleInfo, path: Path) -> Path:
    """Attach ``info`` to the encoder graph and write the bundle to ``path`` atomically."""
    if info.format_version != BUNDLE_FORMAT:
        raise ValueError(f"bundle format {info.format_version} is not the current {BUNDLE_FORMAT}")
    model = onnx.load(str(encoder_onnx))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info.to_dict())
    model.doc_string = f"cryo-EMMAE encoder bundle ({info.precision})"
    return save_model(model, path)
