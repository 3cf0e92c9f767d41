"""The one statement of the coordinate conventions, and grid <-> micrograph transforms.

Conventions (RELION's, which cryoSPARC imports as is):

* A micrograph array is ``data[row, col]`` in MRC file storage order.
* ``x`` is the column (MRC ``nx`` axis), ``y`` the row (``ny`` axis); no y flip.
* Positions are 0-based and sub-pixel; pixel ``i`` is centred on ``i`` and covers
  ``[i - 0.5, i + 0.5)``.

The working grid is the micrograph scaled isotropically so that its longer side
has ``grid_px`` pixels, then padded at the bottom and right to whole tiles. Pixel
``j`` of the grid covers input pixels ``[j / s - 0.5, (j + 1) / s - 0.5)``, so its
centre maps to ``(j + 0.5) / s - 0.5`` (``s`` per axis, after rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridTransform:
    """Geometry of one micrograph on the working grid.

    ``input_shape``: (ny, nx) of the micrograph; ``valid_shape``: the scaled image on
    the grid; ``padded_shape``: the grid after padding to whole tiles.
    """

    input_shape: tuple[int, int]
    valid_shape: tuple[int, int]
    padded_shape: tuple[int, int]

    @classmethod
    def fit(cls, input_shape: tuple[int, int], grid_px: int, tile_px: int) -> GridTransform:
        """Scale so that the longer side is ``grid_px``, pad each side up to a multiple of ``tile_px``.

        Raises:
            ValueError: an empty input shape or a grid that is not whole tiles.
        """
        ny, nx = (int(n) for n in input_shape)
        if ny < 1 or nx < 1:
            raise ValueError(f"empty micrograph shape {input_shape}")
        if grid_px % tile_px:
            raise ValueError(f"grid_px {grid_px} is not a multiple of tile_px {tile_px}")
        scale = grid_px / max(ny, nx)
        valid = (max(1, round(ny * scale)), max(1, round(nx * scale)))
        padded = tuple(tile_px * math.ceil(n / tile_px) for n in valid)
        return cls(input_shape=(ny, nx), valid_shape=valid, padded_shape=padded)  # type: ignore[arg-type]

    @property
    def scale_yx(self) -> tuple[float, float]:
        """Grid pixels per input pixel along y and x (equal up to rounding)."""
        return (self.valid_shape[0] / self.input_shape[0], self.valid_shape[1] / self.input_shape[1])

    @property
    def scale(self) -> float:
        """The isotropic scale factor (grid pixels per input pixel)."""
        return float(np.sqrt(self.scale_yx[0] * self.scale_yx[1]))

    def grid_to_input(self, xy: np.ndarray) -> np.ndarray:
        """Map grid positions ``[N, 2]`` (x, y) to input-micrograph pixels ``[N, 2]`` (x, y)."""
        xy = np.asarray(xy, dtype=np.float64)
        s = np.array([self.scale_yx[1], self.scale_yx[0]])
        return (xy + 0.5) / s - 0.5

    def input_to_grid(self, xy: np.ndarray) -> np.ndarray:
        """Map input-micrograph positions ``[N, 2]`` (x, y) to grid pixels ``[N, 2]`` (x, y)."""
        xy = np.asarray(xy, dtype=np.float64)
        s = np.array([self.scale_yx[1], self.scale_yx[0]])
        return (xy + 0.5) * s - 0.5
