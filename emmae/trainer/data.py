"""Training data: micrographs -> cached working-grid images -> standardised tiles.

The runtime's own preprocessing and tiling are used, so training and inference see
the same images. Each preprocessed image is cached on disk (``.npy``) under a key of
the file's path, size and mtime, the preprocessing settings and the package version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emmae import __version__
from emmae.config import PreprocessConfig
from emmae.io.atomic import atomic_path
from emmae.io.mrc import read_micrograph
from emmae.runtime.picking.preprocess import preprocess
from emmae.runtime.kernels.tiles import to_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicrographItem:
    """One training micrograph and the particle diameter in its pixels."""

    path: Path
    diameter_px: float


@dataclass(frozen=True)
class Standardisation:
    """Global mean and std of the training tiles (pixels / 255)."""

    mean: float
    std: float

    def apply(self, tiles: np.ndarray) -> np.ndarray:
        return ((tiles - self.mean) / self.std).astype(np.float32)


def items_from_manifest(manifest: Path, split: str) -> list[MicrographItem]:
    """Micrographs of one split from a dataset ``manifest.json`` (``micrographs/<name>.mrc`` beside it).

    The manifest maps names to ``{"split": ..., "diam_px_est": ...}``.

    Raises:
        FileNotFoundError: the manifest or a listed micrograph is missing.
    """
    entries = json.loads(Path(manifest).read_text())["micrographs"]
    items = []
    for name, entry in sorted(entries.items()):
        if entry["split"] != split:
            continue
        path = Path(manifest).parent / "micrographs" / f"{name}.mrc"
        if not path.is_file():
            raise FileNotFoundError(f"{manifest} lists {name}, but {path} is missing")
        items.append(MicrographItem(path=path, diameter_px=float(entry["diam_px_est"])))
    return items


def cached_grid_image(item: MicrographItem, config: PreprocessConfig, cache_dir: Path | None) -> np.ndarray:
    """The preprocessed grid image of ``item`` (float32, 0-255), from the cache when valid."""
    if cache_dir is None:
        return _preprocess(item, config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stat = item.path.stat()
    key = json.dumps(
        [str(item.path.resolve()), stat.st_size, stat.st_mtime_ns, item.diameter_px, config.model_dump(mode="json"), __version__]
    )
    cached = cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"
    if cached.is_file():
        return np.load(cached)
    image = _preprocess(item, config)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, image)
    return image


def _preprocess(item: MicrographItem, config: PreprocessConfig) -> np.ndarray:
    mic = read_micrograph(item.path)
    return np.asarray(preprocess(mic.data, config, item.diameter_px).image, dtype=np.float32)


def load_tiles(items: list[MicrographItem], config: PreprocessConfig, cache_dir: Path | None) -> np.ndarray:
    """All tiles of ``items`` as ``[N, 1, t, t]`` float32 in [0, 1] (grey levels / 255)."""
    tiles = [to_tiles(cached_grid_image(item, config, cache_dir), config.tile_px) for item in items]
    log.info("%d micrographs -> %d tiles", len(items), sum(len(t) for t in tiles))
    return np.concatenate(tiles).astype(np.float32) / np.float32(255)


def fit_standardisation(tiles: np.ndarray) -> Standardisation:
    """Mean and std over every pixel of the training tiles."""
    return Standardisation(mean=float(tiles.mean(dtype=np.float64)), std=float(tiles.std(dtype=np.float64)))
