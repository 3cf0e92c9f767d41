"""Build a training pack (:mod:`emmae.trainer.pack`) from datasets' manifests: their train splits only.

Each micrograph goes through the training data's own path (:func:`emmae.trainer.data.cached_grid_image`:
the runtime's preprocessing, cached), as ``emmae-train`` would read it, then is rounded to uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from emmae.config import PreprocessConfig
from emmae.io.coords import GridTransform
from emmae.io.mrc import read_layout
from emmae.trainer.data import MicrographItem, cached_grid_image, items_from_manifest
from emmae.trainer.pack import Pack, PackedMicrograph, PackError, quantise

log = logging.getLogger(__name__)
SPLIT = "train"  # never valid or test: those measure the models


def dataset_manifests(data: Path) -> dict[str, Path]:
    """Dataset name -> ``manifest.json`` of every ``data/<name>/manifest.json``.

    Raises:
        PackError: none found.
    """
    found = {p.parent.name: p for p in sorted(Path(data).glob("*/manifest.json"))}
    if not found:
        raise PackError(f"no <dataset>/manifest.json under {data}")
    return found


def build_pack(data: Path, config: PreprocessConfig, cache: Path | None = None, limit: int | None = None) -> Pack:
    """The train-split micrographs of every dataset under ``data``, preprocessed with ``config``.

    ``limit``: at most this many micrographs per dataset (for tests). Raises PackError,
    FileNotFoundError (a listed micrograph is missing), MicrographError.
    """
    data = Path(data)
    micrographs, images = [], []
    for dataset, manifest in dataset_manifests(data).items():
        items = items_from_manifest(manifest, SPLIT)[:limit]
        for item in items:
            micrographs.append(_entry(item, dataset, data, config))
            images.append(quantise(cached_grid_image(item, config, cache)))
        log.info("%s: %d %s micrographs", dataset, len(items), SPLIT)
    if not images:
        raise PackError(f"no {SPLIT}-split micrographs under {data}")
    stack = np.zeros((len(images), config.grid_px, config.grid_px), dtype=np.uint8)
    for i, (image, entry) in enumerate(zip(images, micrographs, strict=True)):
        if image.shape != entry.shape:
            raise PackError(f"{entry.name}: grid image {image.shape}, expected {entry.shape}")
        stack[i, : image.shape[0], : image.shape[1]] = image
    return Pack(images=stack, micrographs=micrographs, preprocess=config.model_dump(mode="json"))


def _entry(item: MicrographItem, dataset: str, data: Path, config: PreprocessConfig) -> PackedMicrograph:
    layout = read_layout(item.path)
    transform = GridTransform.fit((layout.ny, layout.nx), config.grid_px, config.tile_px)
    return PackedMicrograph(name=item.path.stem, dataset=dataset, split=SPLIT, diameter_px=item.diameter_px,
                            shape=transform.padded_shape, valid=transform.valid_shape, source=item.path.relative_to(data).as_posix())
