"""Antialiased resampling onto the working grid, and padding to whole tiles.

Resampling is separable: ``out = W_y @ image @ W_x.T`` with one weight matrix per
axis. Output pixel ``j`` is centred on input position ``(j + 0.5) / s - 0.5``
(:mod:`emmae.io.coords`). Two kernels:

* ``area``: each output pixel is the mean of the input area it covers (exact
  pixel overlaps; bilinear when enlarging), OpenCV's INTER_AREA;
* ``cubic``: Keys' bicubic (a = -0.5) stretched by ``1 / s`` when shrinking
  (antialiased, as PIL and ``torch`` with ``antialias=True`` do).

Windows are cut at the image border and renormalised. On the CPU, ``area`` goes
through OpenCV and ``cubic`` through a sparse product; on the GPU an ``area`` binning
by whole factors is a block mean, anything else two dense matrix products. The
weights of each axis size are computed once.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import cv2
import numpy as np
import scipy.sparse

from emmae.backend import backend_of
from emmae.runtime.kernels.filters import Array

Kernel = Literal["area", "cubic"]


def resample_weights(n_in: int, n_out: int, kernel: Kernel) -> np.ndarray:
    """Row-normalised float64 weights ``[n_out, n_in]`` of one axis."""
    scale = n_out / n_in
    centres = (np.arange(n_out) + 0.5) / scale - 0.5  # [n_out] in input pixels
    inputs = np.arange(n_in, dtype=np.float64)
    offsets = inputs[None, :] - centres[:, None]  # [n_out, n_in]
    if kernel == "area" and scale < 1:
        half = 0.5 / scale
        weights = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0, None)
    elif kernel == "area":
        weights = np.clip(1 - np.abs(offsets), 0, None)
    elif kernel == "cubic":
        weights = _keys_cubic(offsets * min(scale, 1.0))
    else:
        raise ValueError(f"unknown resampling kernel {kernel!r}")
    return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=16)
def _weights32(n_in: int, n_out: int, kernel: Kernel) -> np.ndarray:
    """:func:`resample_weights` in float32, computed once per axis size (read-only)."""
    weights = resample_weights(n_in, n_out, kernel).astype(np.float32)
    weights.setflags(write=False)
    return weights


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resize(image: Array, shape: tuple[int, int], kernel: Kernel, *, use_opencv: bool = True) -> Array:
    """Resample a 2-D float32 image to ``shape`` (ny, nx) with ``kernel``."""
    if tuple(image.shape) == tuple(shape):
        return image.astype(np.float32)
    backend = backend_of(image)
    if not backend.is_gpu and use_opencv and kernel == "area":
        return cv2.resize(image.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    if backend.is_gpu and kernel == "area" and is_integer_factor(image.shape[0], shape[0]) and is_integer_factor(image.shape[1], shape[1]):
        fy, fx = image.shape[0] // shape[0], image.shape[1] // shape[1]  # whole blocks: the area mean is a block mean
        return image.astype(np.float32).reshape(shape[0], fy, shape[1], fx).mean(axis=(1, 3))
    w_y = _weights32(image.shape[0], shape[0], kernel)
    w_x = _weights32(image.shape[1], shape[1], kernel)
    if backend.is_gpu:
        xp = backend.xp
        return (xp.asarray(w_y) @ image.astype(np.float32)) @ xp.asarray(w_x.T)
    rows = scipy.sparse.csr_array(w_y) @ image.astype(np.float32)  # [ny_out, nx_in]
    return np.ascontiguousarray((scipy.sparse.csr_array(w_x) @ rows.T).T, dtype=np.float32)


def pad_to(image: Array, shape: tuple[int, int]) -> Array:
    """Pad at the bottom and right to ``shape`` by reflection (edge repeat where too small)."""
    xp = backend_of(image).xp
    pad_y, pad_x = shape[0] - image.shape[0], shape[1] - image.shape[1]
    if pad_y < 0 or pad_x < 0:
        raise ValueError(f"cannot pad {image.shape} to the smaller {shape}")
    if not pad_y and not pad_x:
        return image
    mode = "reflect" if pad_y < image.shape[0] and pad_x < image.shape[1] else "edge"
    return xp.pad(image, ((0, pad_y), (0, pad_x)), mode=mode)


def is_integer_factor(n_in: int, n_out: int) -> bool:
    """True when ``n_in`` is a whole multiple of ``n_out``."""
    return n_out > 0 and n_in % n_out == 0 and math.isfinite(n_in / n_out)
