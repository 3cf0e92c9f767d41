"""CLAHE with OpenCV's semantics: OpenCV on the CPU, the array version below on the GPU.

:func:`clahe_array` follows OpenCV's ``CLAHE_CalcLut_Body`` and
``CLAHE_Interpolation_Body`` step by step (tile grid, REFLECT_101 padding at the
bottom/right when a size does not divide, by ``tiles - size % tiles`` on both axes, clip limit per bin
``max(1, int(clip_limit * tile_area / 256))``, redistribution of the clipped
counts with the residual spread every ``256 // residual`` bins, rounded LUT,
bilinear interpolation between the four nearest tile LUTs) in float32, written
once for NumPy and CuPy.
"""

from __future__ import annotations

import cv2
import numpy as np

from emmae.backend import backend_of
from emmae.runtime.kernels.filters import Array

BINS = 256


def clahe(image_u8: Array, clip_limit: float, tiles: int) -> Array:
    """Contrast-limited adaptive histogram equalisation of a uint8 image on a ``tiles x tiles`` grid."""
    if not backend_of(image_u8).is_gpu:
        return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(np.ascontiguousarray(image_u8))
    return clahe_array(image_u8, clip_limit, tiles)


def clahe_array(image_u8: Array, clip_limit: float, tiles: int) -> Array:
    """The backend-generic CLAHE (NumPy or CuPy); matches OpenCV within one grey level."""
    luts = tile_luts(image_u8, clip_limit, tiles)  # [T, T, 256]
    return interpolate_luts(image_u8, luts)


def tile_luts(image_u8: Array, clip_limit: float, tiles: int) -> Array:
    """Per-tile equalisation lookup tables, float32 ``[tiles, tiles, 256]`` holding whole grey levels."""
    xp = backend_of(image_u8).xp
    ny, nx = image_u8.shape
    pad_y, pad_x = _padding(ny, nx, tiles)
    ext = xp.pad(image_u8, ((0, pad_y), (0, pad_x)), mode="reflect") if pad_y or pad_x else image_u8
    th, tw = ext.shape[0] // tiles, ext.shape[1] // tiles
    area = th * tw
    blocks = ext.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, area)
    offsets = (xp.arange(tiles * tiles, dtype=xp.int32) * BINS)[:, None]
    hist = xp.bincount((blocks.astype(xp.int32) + offsets).ravel(), minlength=tiles * tiles * BINS)
    hist = hist.reshape(tiles * tiles, BINS).astype(xp.int64)
    if clip_limit > 0:
        hist = _clip_histograms(hist, max(int(clip_limit * area / BINS), 1))
    scale = np.float32(BINS - 1) / np.float32(area)
    lut = xp.rint(xp.cumsum(hist, axis=1).astype(xp.float32) * scale)
    return xp.clip(lut, 0, 255).reshape(tiles, tiles, BINS)


def _padding(ny: int, nx: int, tiles: int) -> tuple[int, int]:
    """Rows and columns OpenCV adds (bottom, right) before cutting tiles: none when both sizes divide,
    else ``tiles - size % tiles`` on each axis, so a whole extra tile row on an axis that divides."""
    if ny % tiles == 0 and nx % tiles == 0:
        return 0, 0
    return tiles - ny % tiles, tiles - nx % tiles


def _clip_histograms(hist: Array, limit: int) -> Array:
    """Clip each histogram ``[T, 256]`` at ``limit`` and spread the excess as OpenCV does."""
    xp = backend_of(hist).xp
    excess = xp.maximum(hist - limit, 0).sum(axis=1)  # [T]
    hist = xp.minimum(hist, limit) + (excess // BINS)[:, None]
    residual = (excess % BINS)[:, None]  # [T, 1]
    step = xp.maximum(BINS // xp.maximum(residual, 1), 1)
    bins = xp.arange(BINS)[None, :]
    extra = (residual > 0) & (bins % step == 0) & (bins // step < residual)
    return hist + extra


def interpolate_luts(image_u8: Array, luts: Array) -> Array:
    """Map each pixel through the bilinear blend of its four nearest tile LUTs (uint8 out)."""
    xp = backend_of(image_u8).xp
    tiles = luts.shape[0]
    ny, nx = image_u8.shape
    pad_y, pad_x = _padding(ny, nx, tiles)
    th, tw = (ny + pad_y) // tiles, (nx + pad_x) // tiles
    y1, y2, wy = _neighbour_tiles(xp, ny, th, tiles)  # [ny] each
    x1, x2, wx = _neighbour_tiles(xp, nx, tw, tiles)  # [nx] each
    v = image_u8.astype(xp.int32)
    flat = luts.reshape(-1)

    def lut_at(ty: Array, tx: Array) -> Array:
        return flat[(ty[:, None] * tiles + tx[None, :]) * BINS + v]  # [ny, nx]

    top = lut_at(y1, x1) * (1 - wx)[None, :] + lut_at(y1, x2) * wx[None, :]
    bottom = lut_at(y2, x1) * (1 - wx)[None, :] + lut_at(y2, x2) * wx[None, :]
    out = top * (1 - wy)[:, None] + bottom * wy[:, None]
    return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8)


def _neighbour_tiles(xp, n: int, tile: int, tiles: int) -> tuple[Array, Array, Array]:
    """For positions ``0 .. n-1``: the lower and upper tile index and the weight of the upper."""
    pos = xp.arange(n, dtype=xp.float32) * xp.float32(1.0 / tile) - xp.float32(0.5)
    lower = xp.floor(pos)
    weight = (pos - lower).astype(xp.float32)
    lower = lower.astype(xp.int32)
    return xp.clip(lower, 0, tiles - 1), xp.clip(lower + 1, 0, tiles - 1), weight
