"""Array filters of the preprocessing, written once for NumPy and CuPy.

Every function takes and returns a 2-D float32 array on either backend. On the
CPU, separable filters go through OpenCV (the same linear operation, SIMD and
multi-threaded); elsewhere through ``ndimage.correlate1d``. Borders are
reflected without repeating the edge pixel (OpenCV's REFLECT_101, ndimage's
``mirror``) unless stated otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from emmae.backend import Backend, backend_of

Array = Any  # numpy.ndarray or cupy.ndarray


MIN_DIAMETER_PX = 4.0


def minmax(image: Array) -> Array:
    """Scale to [0, 1]; a constant image becomes all zeros."""
    lo, hi = image.min(), image.max()
    span = hi - lo
    xp = backend_of(image).xp
    return xp.where(span > 0, (image - lo) / xp.where(span > 0, span, 1), 0).astype(np.float32)


def to_uint8(image: Array) -> Array:
    """Min-max scale to [0, 255] and truncate to uint8 (the reference's conversion)."""
    xp = backend_of(image).xp
    return xp.clip(xp.floor(minmax(image) * 255.0), 0, 255).astype(np.uint8)


def ring_mask(diameter_px: float) -> np.ndarray:
    """The local-normalisation mask: the ``diameter_px`` box minus its inscribed disk.

    Ones at offsets ``(dy, dx)`` in ``[-R, R]^2`` (``R = round(diameter_px / 2)``)
    with ``dy^2 + dx^2 >= (diameter_px / 2)^2``, zeros inside the disk; float32
    ``[2R + 1, 2R + 1]``, centred, symmetric (no half-pixel shift).

    Raises:
        ValueError: a diameter below ``MIN_DIAMETER_PX``.
    """
    if not diameter_px >= MIN_DIAMETER_PX:
        raise ValueError(f"diameter {diameter_px} px is too small for local normalisation (< {MIN_DIAMETER_PX} px)")
    radius = diameter_px / 2.0
    half = int(round(radius))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 >= radius**2).astype(np.float32)


_VARIANCE_FLOOR = 1e-5  # relative to the (globally standardised) image's scale


@dataclass(frozen=True)
class RingSpectrum:
    """The FFT of :func:`ring_mask` for images of one shape (reusable across micrographs)."""

    image_shape: tuple[int, int]
    fft_shape: tuple[int, int]
    half: int
    weight: float  # number of ones in the mask
    spectrum: Array  # real [fy, fx // 2 + 1] on the backend's device


def ring_spectrum(image_shape: tuple[int, int], diameter_px: float, backend: Backend) -> RingSpectrum:
    """Precompute the ring's spectrum for :func:`local_normalise` on ``image_shape`` images."""
    mask = ring_mask(diameter_px)
    half = mask.shape[0] // 2
    fft = backend.fft
    fft_shape = tuple(fft.next_fast_len(n + 2 * half, real=True) for n in image_shape)
    wrapped = np.zeros(fft_shape, dtype=np.float32)  # the mask centred on (0, 0), wrapped around
    wrapped[: half + 1, : half + 1] = mask[half:, half:]
    wrapped[-half:, : half + 1] = mask[:half, half:]
    wrapped[: half + 1, -half:] = mask[half:, :half]
    wrapped[-half:, -half:] = mask[:half, :half]
    spectrum = fft.rfft2(backend.asarray(wrapped), **backend.fft_kwargs()).real  # symmetric mask: real
    return RingSpectrum(tuple(image_shape), fft_shape, half, float(mask.sum()), spectrum)  # type: ignore[arg-type]


def local_normalise(image: Array, diameter_px: float, ring: RingSpectrum | None = None) -> Array:
    """RELION-style local normalisation ``(x - mean) / sigma`` under :func:`ring_mask`.

    Local sums are circular FFT correlations of an image padded by reflection (so
    the borders see the image, not the opposite edge). Where the local variance is
    zero up to float32 round-off (a flat region) the output is 0, never NaN.
    ``ring`` (from :func:`ring_spectrum`, same shape and diameter) saves one FFT.
    """
    backend = backend_of(image)
    xp, fft, kw = backend.xp, backend.fft, backend.fft_kwargs()
    if ring is None or ring.image_shape != tuple(image.shape):
        ring = ring_spectrum(tuple(image.shape), diameter_px, backend)  # type: ignore[arg-type]
    half = ring.half
    ny, nx = image.shape
    x = image.astype(np.float32)
    x -= x.mean()
    x *= 1 / xp.maximum(x.std(), np.float32(1e-30))  # conditioning only: the result is scale-free
    padded = xp.pad(x, half, mode="reflect" if min(ny, nx) > half else "symmetric")
    batch = xp.empty((2, *padded.shape), dtype=np.float32)  # [x, x^2]
    batch[0] = padded
    xp.multiply(padded, padded, out=batch[1])
    spectrum = fft.rfft2(batch, s=ring.fft_shape, **kw)
    spectrum *= ring.spectrum
    sums = fft.irfft2(spectrum, s=ring.fft_shape, **kw)[:, half : half + ny, half : half + nx]
    sums *= np.float32(1 / ring.weight)
    mean, mean_sq = sums[0], sums[1]
    # Below this, a local variance is float32 round-off of E[x^2] - mean^2: a flat region.
    flat = np.float32(_VARIANCE_FLOOR) * (1 + mean_sq)
    variance = mean_sq - mean * mean
    x -= mean
    x /= xp.sqrt(xp.maximum(variance, flat))
    x[variance <= flat] = 0
    return x


def gaussian_kernel(sigma_px: float, radius_px: int) -> np.ndarray:
    """Normalised 1-D Gaussian taps at offsets ``-radius .. radius`` (``[1.]`` for sigma 0)."""
    if sigma_px <= 0 or radius_px <= 0:
        return np.ones(1, dtype=np.float32)
    offsets = np.arange(-radius_px, radius_px + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def box_kernel(width_px: float, passes: int = 1) -> np.ndarray:
    """Normalised, centred 1-D box of (possibly fractional) width, convolved ``passes`` times.

    A box of width ``w`` has taps at ``-m .. m`` with ``m = ceil((w - 1) / 2)``: weight 1
    inside and ``(w - (2m - 1)) / 2`` at both ends, so even and fractional widths stay
    centred (an even-width box otherwise shifts the image by half a pixel per pass).
    """
    if width_px < 1:
        raise ValueError(f"box width {width_px} px is below 1")
    m = math.ceil((width_px - 1) / 2)
    taps = np.ones(2 * m + 1, dtype=np.float64)
    end = (width_px - (2 * m - 1)) / 2
    taps[0] = taps[-1] = end if m > 0 else 1.0
    kernel = np.ones(1)
    for _ in range(passes):
        kernel = np.convolve(kernel, taps / taps.sum())
    return kernel.astype(np.float32)


def separable_filter(image: Array, kernel_y: np.ndarray, kernel_x: np.ndarray, *, use_opencv: bool = True) -> Array:
    """Correlate with ``kernel_y`` along rows then ``kernel_x`` along columns (odd, centred kernels).

    REFLECT_101 borders. On the CPU OpenCV does the work unless ``use_opencv`` is False.
    """
    backend = backend_of(image)
    image = image.astype(np.float32, copy=False)
    if not backend.is_gpu and use_opencv:
        return cv2.sepFilter2D(image, cv2.CV_32F, kernel_x, kernel_y, borderType=cv2.BORDER_REFLECT_101)
    xp, ndi = backend.xp, backend.ndimage
    out = ndi.correlate1d(image, xp.asarray(kernel_y), axis=0, mode="mirror")
    return ndi.correlate1d(out, xp.asarray(kernel_x), axis=1, mode="mirror")


def gaussian_blur(image: Array, sigma_px: float, radius_px: int) -> Array:
    """Gaussian smoothing, centred (none of the reference's 4-px shift)."""
    kernel = gaussian_kernel(sigma_px, radius_px)
    return image.astype(np.float32) if kernel.size == 1 else separable_filter(image, kernel, kernel)


def box_blur(image: Array, width_px: float, passes: int) -> Array:
    """``passes`` centred box blurs of width ``width_px`` (the reference's "guided filter")."""
    if passes == 0:
        return image.astype(np.float32)
    kernel = box_kernel(width_px, passes)
    return separable_filter(image, kernel, kernel)
