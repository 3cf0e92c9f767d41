"""``pick_micrograph``: the one call that the batch command, the daemon and the benches share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emmae.backend import to_host
from emmae.config import EmmaeConfig, PreprocessConfig, resolve_diameter_px
from emmae.io.mrc import read_micrograph
from emmae.runtime.cluster import particle_region, smoothing_window
from emmae.runtime.encoder import Encoder
from emmae.runtime.postprocess import Candidates, candidates, picks
from emmae.runtime.preprocess import preprocess


@dataclass(frozen=True)
class Picks:
    """Particle picks of one micrograph, in its pixels (x = column, y = row, sub-pixel).

    ``xy``/``score``: the kept picks; ``candidates_xy``/``candidates_score``: every
    candidate before neighbour suppression and the border margin, for re-thresholding.
    """

    name: str
    shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float | None
    diameter_px: float
    xy: np.ndarray
    score: np.ndarray
    candidates_xy: np.ndarray
    candidates_score: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.score)


@contextmanager
def _timed(timings: dict[str, float], name: str, sync) -> Iterator[None]:
    start = time.perf_counter()
    yield
    sync()
    timings[name] = time.perf_counter() - start


def model_preprocess_config(config: EmmaeConfig, encoder: Encoder) -> PreprocessConfig:
    """The bundle's training preprocessing, with the user's mode, diameter and pixel size."""
    user = config.preprocess
    trained = PreprocessConfig(**encoder.bundle.info.preprocess)
    return trained.model_copy(update={"mode": user.mode, "diameter_px": user.diameter_px, "diameter_A": user.diameter_A, "pixel_size_A": user.pixel_size_A})


def pick_micrograph(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None, pixel_size_A: float | None = None) -> Picks:
    """Pick one micrograph (a path, or an array ``[row, col]``) with an opened encoder.

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    backend = encoder.backend
    timings: dict[str, float] = {}
    with _timed(timings, "read", lambda: None):
        if isinstance(source, (str, Path)):
            mic = read_micrograph(source)
            image, header_px, label = mic.data, mic.pixel_size_A, name or str(source)
        else:
            image, header_px, label = np.asarray(source, dtype=np.float32), pixel_size_A, name or "array"
    pre = model_preprocess_config(config, encoder)
    diameter_px = resolve_diameter_px(pre, header_px)
    with _timed(timings, "preprocess", backend.synchronize):
        grid = preprocess(image, pre, diameter_px, backend)
    patch = encoder.bundle.info.patch_px
    with _timed(timings, "encode", backend.synchronize):
        latents = encoder.encode(grid.image)
    valid = tuple(-(-n // patch) for n in grid.transform.valid_shape)  # latents that cover the micrograph
    with _timed(timings, "cluster", backend.synchronize):
        window = smoothing_window(grid.diameter_grid_px, patch)
        region = to_host(particle_region(latents[: valid[0], : valid[1]], encoder.bundle.info.centroid_array(), encoder.bundle.info.particle_cluster, window, config.cluster))
    with _timed(timings, "postprocess", lambda: None):
        found = candidates(region, patch, grid.diameter_grid_px, config.postprocess)
        kept = picks(found, grid.diameter_grid_px, grid.transform.valid_shape, config.postprocess)
    return Picks(
        name=label, shape=tuple(image.shape), pixel_size_A=header_px if pre.pixel_size_A is None else pre.pixel_size_A,
        diameter_px=diameter_px, xy=grid.transform.grid_to_input(kept.xy), score=kept.score,
        candidates_xy=grid.transform.grid_to_input(found.xy), candidates_score=found.score, timings_s=timings,
    )


__all__ = ["Candidates", "Picks", "pick_micrograph"]
