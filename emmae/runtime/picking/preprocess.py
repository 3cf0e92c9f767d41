"""Micrograph -> working-grid image (method section 1), on NumPy or CuPy.

Two modes, chosen by ``PreprocessConfig.mode``:

* ``reference``: the filters run at the micrograph's resolution, as the authors
  did, and the result is resized (antialiased bicubic) onto the grid;
* ``fast`` (default): the micrograph is first binned onto the grid (exact area
  averaging) and the filters run there: 16x less work for a 4096^2 micrograph.

Filter sizes are given in grid pixels (``PreprocessConfig``) and scaled up by the
binning factor when the ``reference`` mode filters at full resolution.

Either way the result is a float32 image in grey levels 0-255 (the reference's
PNG range, not quantised), scaled isotropically so its longer side has
``grid_px`` pixels and padded (by reflection) at the bottom/right to whole tiles,
together with the :class:`~emmae.io.coords.GridTransform` that maps grid positions
back to micrograph pixels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emmae.backend import CPU, Backend
from emmae.config import PreprocessConfig
from emmae.io.coords import GridTransform
from emmae.errors import ConfigError
from emmae.runtime.kernels.clahe import clahe
from emmae.runtime.kernels.filters import (
    MIN_DIAMETER_PX,
    Array,
    RingSpectrum,
    box_blur,
    gaussian_blur,
    local_normalise,
    minmax,
    ring_spectrum,
    to_uint8,
)
from emmae.runtime.kernels.resize import pad_to, resize

Step = tuple[str, Callable[[Array], Array]]


@dataclass(frozen=True)
class Preprocessed:
    """A micrograph on the working grid.

    ``image``: float32 ``[Hp, Wp]`` (grey levels 0-255, padded to whole tiles, on the
    backend's device); ``transform``: grid <-> micrograph geometry;
    ``diameter_grid_px``: the particle diameter in grid pixels; ``binned``: float32
    ``[H, W]`` (the valid region, not padded), the micrograph area-binned onto the grid
    with no filter, in its own grey levels (what particle templates are matched on).
    """

    image: Array
    transform: GridTransform
    diameter_grid_px: float
    binned: Array | None = None


def preprocess(
    image: Any, config: PreprocessConfig, diameter_px: float, backend: Backend = CPU
) -> Preprocessed:
    """Preprocess one micrograph ``image[row, col]`` whose particles are ``diameter_px`` across.

    Raises:
        ValueError: the image is not 2-D, or the diameter is not positive or too
            small on the working grid.
    """
    transform, steps = plan(tuple(image.shape), config, diameter_px, backend)
    head = 2 if config.mode == "fast" else 1  # upload (and bin): the unfiltered image
    start = run_steps(image, steps[:head])
    out = run_steps(start, steps[head:])
    binned = start if config.mode == "fast" else resize(start, transform.valid_shape, "area")
    return Preprocessed(image=out, transform=transform, diameter_grid_px=diameter_px * transform.scale, binned=binned)


def plan(
    shape: tuple[int, ...], config: PreprocessConfig, diameter_px: float, backend: Backend = CPU
) -> tuple[GridTransform, list[Step]]:
    """The geometry and the named steps that preprocess an image of ``shape`` (benches time each)."""
    if len(shape) != 2:
        raise ValueError(f"a micrograph is a 2-D array, got shape {shape}")
    if not diameter_px > 0:
        raise ValueError(f"the particle diameter must be positive, got {diameter_px} px")
    transform = GridTransform.fit(shape, config.grid_px, config.tile_px)  # type: ignore[arg-type]
    if diameter_px * transform.scale < MIN_DIAMETER_PX:
        raise ConfigError(
            f"particles of {diameter_px:g} px are {diameter_px * transform.scale:.1f} px on the {config.grid_px}-px grid: too small "
            f"(< {MIN_DIAMETER_PX:g} px) to pick; check the diameter (--diameter-px is in pixels of the micrograph) or set a larger "
            "preprocess.grid_px"
        )
    # Resolution of the filtering, relative to the micrograph: the grid's, or full.
    scale = transform.scale if config.mode == "fast" else 1.0
    upload: Step = ("upload", lambda a: backend.asarray(a, dtype=np.float32))
    pad: Step = ("pad", lambda a: pad_to(a, transform.padded_shape))
    filter_shape = transform.valid_shape if config.mode == "fast" else (shape[0], shape[1])
    ring = ring_spectrum(filter_shape, diameter_px * scale, backend)
    filters = _filter_steps(config, diameter_px * scale, scale / transform.scale, ring)
    if config.mode == "fast":
        bin_step: Step = ("bin", lambda a: resize(a, transform.valid_shape, "area"))
        return transform, [upload, bin_step, *filters, pad]
    resize_step: Step = ("resize", lambda a: backend.xp.clip(resize(a, transform.valid_shape, "cubic"), 0, 255))
    return transform, [upload, *filters, resize_step, pad]


def _filter_steps(config: PreprocessConfig, diameter_px: float, per_grid_px: float, ring: RingSpectrum) -> list[Step]:
    """Normalise, smooth, CLAHE, box blur; ``per_grid_px`` pixels of the filtered image per grid pixel."""
    sigma = config.gaussian_sigma_grid_px * per_grid_px
    radius = max(1, round(config.gaussian_radius_grid_px * per_grid_px)) if config.gaussian_radius_grid_px else 0
    box = max(1.0, config.box_grid_px * per_grid_px)
    return [
        ("normalise", lambda a: local_normalise(a, diameter_px, ring)),
        ("gaussian", lambda a: gaussian_blur(a, sigma, radius)),
        ("clahe", lambda a: clahe(to_uint8(a), config.clahe_clip_limit, config.clahe_tiles)),
        ("box", lambda a: minmax(box_blur(a.astype(np.float32), box, config.box_passes)) * np.float32(255)),
    ]


def run_steps(image: Any, steps: Sequence[Step], timings: dict[str, float] | None = None, sync: Callable[[], None] | None = None) -> Array:
    """Apply ``steps`` in order; with ``timings``, record each step's seconds (calling ``sync`` first)."""
    for name, step in steps:
        start = time.perf_counter()
        image = step(image)
        if timings is not None:
            if sync is not None:
                sync()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return image
