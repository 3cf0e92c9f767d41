"""CLAHE against OpenCV: the array implementation (NumPy here, CuPy on a GPU) within one grey level."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from emmae.runtime.kernels.clahe import clahe_array, tile_luts


def _image(rng, shape):
    ramp = np.linspace(0, 90, shape[1])[None, :]
    return np.clip(rng.normal(110, 25, shape) + ramp, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(256, 256), (300, 257), (97, 130), (1024, 768)])
@pytest.mark.parametrize("clip_limit", [2.0, 0.5, 40.0, 0.0])
def test_array_clahe_matches_opencv(backend, host, rng, shape, clip_limit):
    image = _image(rng, shape)
    expected = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(16, 16)).apply(image)
    out = host(clahe_array(backend.asarray(image), clip_limit, 16))
    assert out.dtype == np.uint8 and out.shape == shape
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("shape", [(200, 180), (512, 700), (200, 184)])  # one size divides, the other not; both
@pytest.mark.parametrize("tiles", [1, 4, 8])
def test_other_tile_grids(backend, host, rng, tiles, shape):
    image = _image(rng, shape)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(tiles, tiles)).apply(image)
    out = host(clahe_array(backend.asarray(image), 2.0, tiles))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_clip_limit_redistribution_keeps_counts(rng):
    image = np.full((64, 64), 100, np.uint8)
    image[:8, :8] = rng.integers(0, 256, (8, 8))
    luts = tile_luts(image, 2.0, 4)  # 16x16-pixel tiles, clip = max(1, int(2 * 256 / 256)) = 2
    assert luts.shape == (4, 4, 256)
    assert luts[:, :, -1].min() == 255  # every tile's CDF ends at the full count after redistribution
    assert np.all(np.diff(luts, axis=-1) >= 0)


def test_constant_image(backend, host):
    image = np.full((64, 64), 77, np.uint8)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(16, 16)).apply(image)
    np.testing.assert_array_equal(host(clahe_array(backend.asarray(image), 2.0, 16)), expected)
