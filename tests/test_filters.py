"""Each preprocessing filter against a float64 NumPy/SciPy reference or an analytic case."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from emmae.runtime.kernels.filters import (
    box_blur,
    box_kernel,
    gaussian_blur,
    gaussian_kernel,
    local_normalise,
    minmax,
    ring_mask,
    ring_spectrum,
    separable_filter,
    to_uint8,
)


def _reference_local_normalise(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """Direct float64 sliding sums over the ring's offsets (no FFT)."""
    x = image.astype(np.float64)
    mask = ring_mask(diameter_px).astype(bool)
    half = mask.shape[0] // 2
    padded = np.pad(x, half, mode="reflect")
    ny, nx = x.shape
    total = np.zeros_like(x)
    total_sq = np.zeros_like(x)
    for dy, dx in np.argwhere(mask):
        window = padded[dy : dy + ny, dx : dx + nx]
        total += window
        total_sq += window**2
    mean = total / mask.sum()
    sigma = np.sqrt(np.maximum(total_sq / mask.sum() - mean**2, 0))
    return np.where(sigma > 1e-9, (x - mean) / np.where(sigma > 1e-9, sigma, 1), 0)


def test_ring_mask_is_box_minus_inscribed_disk():
    mask = ring_mask(56)
    assert mask.shape == (57, 57)
    offsets = np.arange(-28, 29)
    expected = (offsets[:, None] ** 2 + offsets[None, :] ** 2 >= 28**2).astype(np.float32)
    np.testing.assert_array_equal(mask, expected)
    assert mask[28, 28] == 0 and mask[0, 0] == 1 and mask[0, 28] == 1 and mask[1, 28] == 0
    np.testing.assert_array_equal(mask, mask[::-1, ::-1])
    with pytest.raises(ValueError, match="too small"):
        ring_mask(3.5)


@pytest.mark.parametrize(("shape", "diameter"), [((64, 80), 10.0), ((50, 50), 13.0), ((40, 96), 7.4)])
def test_local_normalise_matches_float64_reference(backend, host, rng, shape, diameter):
    image = (rng.normal(100, 5, shape) + np.linspace(0, 40, shape[1])[None, :]).astype(np.float32)
    out = host(local_normalise(backend.asarray(image), diameter))
    reference = _reference_local_normalise(image, diameter)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, atol=2e-3, rtol=1e-3)


def test_local_normalise_is_affine_invariant(backend, host, rng):
    image = rng.normal(0, 1, (64, 64)).astype(np.float32)
    a = host(local_normalise(backend.asarray(image), 12))
    b = host(local_normalise(backend.asarray(image * 250 + 3000), 12))
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_local_normalise_guards_zero_sigma(backend, host, rng):
    image = np.full((64, 64), 7.0, np.float32)
    image[:, 40:] += rng.normal(0, 1, (64, 24)).astype(np.float32)
    out = host(local_normalise(backend.asarray(image), 8))
    assert np.isfinite(out).all()
    assert np.all(out[:, :20] == 0)  # the ring there only sees the flat region: sigma = 0
    assert np.abs(out[:, 45:]).max() > 0.5
    assert np.all(host(local_normalise(backend.asarray(np.zeros((32, 32), np.float32)), 6)) == 0)


def test_gaussian_kernel_is_the_reference_9x9_sigma_3():
    taps = gaussian_kernel(3.0, 4)
    offsets = np.arange(-4, 5)
    expected = np.exp(-0.5 * (offsets / 3.0) ** 2)
    np.testing.assert_allclose(taps, expected / expected.sum(), rtol=1e-6)
    np.testing.assert_array_equal(gaussian_kernel(0.0, 4), [1.0])


@pytest.mark.parametrize("use_opencv", [True, False])
def test_gaussian_blur_matches_scipy_float64(backend, host, rng, use_opencv):
    image = rng.normal(size=(70, 90)).astype(np.float32)
    kernel = gaussian_kernel(3.0, 4).astype(np.float64)
    reference = ndi.correlate(image.astype(np.float64), np.outer(kernel, kernel), mode="mirror")
    out = host(separable_filter(backend.asarray(image), gaussian_kernel(3.0, 4), gaussian_kernel(3.0, 4), use_opencv=use_opencv))
    np.testing.assert_allclose(out, reference, atol=1e-5)
    np.testing.assert_allclose(host(gaussian_blur(backend.asarray(image), 3.0, 4)), reference, atol=1e-5)


def test_gaussian_blur_does_not_shift(backend, host):
    image = np.zeros((41, 41), np.float32)
    image[20, 20] = 1.0
    out = host(gaussian_blur(backend.asarray(image), 3.0, 4))
    assert np.unravel_index(out.argmax(), out.shape) == (20, 20)
    np.testing.assert_allclose(ndi.center_of_mass(out), (20.0, 20.0), atol=1e-6)
    np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-7)


def test_box_kernel_widths():
    k20 = box_kernel(20)
    assert k20.size == 21
    np.testing.assert_allclose(k20[1:-1], 1 / 20)
    np.testing.assert_allclose(k20[[0, -1]], 0.5 / 20)
    np.testing.assert_allclose(box_kernel(5), np.full(5, 0.2))
    np.testing.assert_allclose(box_kernel(1), [1.0])
    k = box_kernel(3.56)  # fractional width: ends weigh 0.28
    np.testing.assert_allclose(k * 3.56, [0.28, 1, 1, 1, 0.28], rtol=1e-6)
    np.testing.assert_allclose(box_kernel(20, passes=2), np.convolve(k20, k20), rtol=1e-6)
    for width in (20, 3.56, 7):
        assert box_kernel(width, 2).sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="below 1"):
        box_kernel(0.5)


def test_double_box_blur_matches_scipy_float64(backend, host, rng):
    image = rng.integers(0, 256, (96, 80)).astype(np.float32)
    kernel = np.convolve(box_kernel(20).astype(np.float64), box_kernel(20).astype(np.float64))
    reference = ndi.correlate1d(ndi.correlate1d(image.astype(np.float64), kernel, 0, mode="mirror"), kernel, 1, mode="mirror")
    out = host(box_blur(backend.asarray(image), 20.0, 2))
    np.testing.assert_allclose(out, reference, atol=2e-3)
    impulse = np.zeros((81, 81), np.float32)
    impulse[40, 40] = 1
    spread = host(box_blur(backend.asarray(impulse), 20.0, 2))
    np.testing.assert_allclose(ndi.center_of_mass(spread), (40.0, 40.0), atol=1e-5)  # centred: no shift


def test_minmax_and_uint8(backend, host):
    image = backend.asarray(np.array([[2.0, 4.0], [6.0, 10.0]], np.float32))
    np.testing.assert_allclose(host(minmax(image)), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(host(to_uint8(image)), np.array([[0, 63], [127, 255]], np.uint8))
    flat = backend.asarray(np.full((3, 3), 5.0, np.float32))
    np.testing.assert_array_equal(host(minmax(flat)), np.zeros((3, 3)))


def test_precomputed_ring_spectrum_gives_the_same_result(backend, host, rng):
    image = rng.normal(size=(90, 70)).astype(np.float32)
    ring = ring_spectrum((90, 70), 11.0, backend)
    with_ring = host(local_normalise(backend.asarray(image), 11.0, ring))
    np.testing.assert_allclose(with_ring, host(local_normalise(backend.asarray(image), 11.0)), atol=1e-6)
    other = rng.normal(size=(60, 60)).astype(np.float32)  # a ring for another shape is not used
    np.testing.assert_allclose(
        host(local_normalise(backend.asarray(other), 11.0, ring)), _reference_local_normalise(other, 11.0), atol=2e-3
    )
