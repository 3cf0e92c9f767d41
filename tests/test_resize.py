"""Resampling and the grid geometry against float64 references and analytic cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi

from emmae.io.coords import GridTransform
from emmae.runtime.kernels.resize import pad_to, resample_weights, resize


@pytest.mark.parametrize(("n_in", "n_out"), [(4096, 1024), (5760, 1024), (4092, 727), (333, 100)])
def test_area_weights_match_opencv_inter_area(rng, n_in, n_out):
    image = rng.random((n_in, 64)).astype(np.float32)
    ours = resample_weights(n_in, n_out, "area") @ image.astype(np.float64)
    expected = cv2.resize(image, (64, n_out), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("kernel", ["area", "cubic"])
@pytest.mark.parametrize("use_opencv", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (60, 50)])  # whole factors (a block mean on the GPU), and not
def test_resize_equals_float64_separable_product(backend, host, rng, kernel, use_opencv, shape):
    image = rng.random((256, 192)).astype(np.float32)
    out = host(resize(backend.asarray(image), shape, kernel, use_opencv=use_opencv))
    w_y, w_x = resample_weights(256, shape[0], kernel), resample_weights(192, shape[1], kernel)
    np.testing.assert_allclose(out, w_y @ image.astype(np.float64) @ w_x.T, atol=1e-5)


@pytest.mark.parametrize("kernel", ["area", "cubic"])
def test_weights_are_normalised_and_keep_constants_and_ramps(kernel):
    weights = resample_weights(400, 100, kernel)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    ramp = np.arange(400, dtype=np.float64)
    centres = (np.arange(100) + 0.5) * 4 - 0.5  # input position of each output pixel
    inner = slice(3, -3)  # away from the border, where windows are cut
    np.testing.assert_allclose((weights @ ramp)[inner], centres[inner], atol=1e-9)


def test_cubic_is_antialiased():
    checker = np.indices((256, 256)).sum(axis=0) % 2 * 2.0 - 1  # Nyquist pattern, mean 0
    out = resize(checker.astype(np.float32), (64, 64), "cubic")
    assert np.abs(out[4:-4, 4:-4]).max() < 1e-3  # a plain bicubic sample would alias to +-1
    wave = np.cos(2 * np.pi * np.arange(512) / 128.0)  # 4 cycles: well below the new Nyquist
    small = resample_weights(512, 128, "cubic") @ wave
    expected = np.cos(2 * np.pi * ((np.arange(128) + 0.5) * 4 - 0.5) / 128.0)
    np.testing.assert_allclose(small[4:-4], expected[4:-4], atol=0.02)


@pytest.mark.parametrize("kernel", ["area", "cubic"])
def test_positions_follow_the_grid_transform(kernel):
    shape = (600, 800)
    transform = GridTransform.fit(shape, 256, 64)
    blob_xy = np.array([[613.0, 137.0]])  # x = column, y = row
    yy, xx = np.indices(shape)
    image = np.exp(-((xx - blob_xy[0, 0]) ** 2 + (yy - blob_xy[0, 1]) ** 2) / (2 * 12.0**2)).astype(np.float32)
    out = resize(image, transform.valid_shape, kernel)
    row, col = ndi.center_of_mass(out)
    np.testing.assert_allclose([col, row], transform.input_to_grid(blob_xy)[0], atol=0.05)


def test_grid_transform_shapes_and_round_trip():
    square = GridTransform.fit((4096, 4096), 1024, 64)
    assert square.valid_shape == square.padded_shape == (1024, 1024)
    assert square.scale == 0.25
    np.testing.assert_allclose(square.grid_to_input(np.array([[0.0, 0.0], [1023.0, 10.0]])), [[1.5, 1.5], [4093.5, 41.5]])
    k3 = GridTransform.fit((4092, 5760), 1024, 64)  # K3: 5760 x 4092 (nx x ny)
    assert k3.valid_shape == (727, 1024) and k3.padded_shape == (768, 1024)
    assert k3.scale_yx[0] == pytest.approx(k3.scale_yx[1], rel=1e-3)  # isotropic up to rounding
    small = GridTransform.fit((1000, 700), 1024, 64)  # enlarged, not shrunk
    assert small.valid_shape == (1024, 717) and small.padded_shape == (1024, 768)
    xy = np.random.default_rng(0).uniform(0, 4000, (50, 2))
    for transform in (square, k3, small):
        np.testing.assert_allclose(transform.grid_to_input(transform.input_to_grid(xy)), xy, atol=1e-9)
    with pytest.raises(ValueError, match="not a multiple"):
        GridTransform.fit((100, 100), 1000, 64)


def test_pad_to_reflects_at_bottom_right(backend, host):
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = host(pad_to(backend.asarray(image), (5, 6)))
    np.testing.assert_array_equal(out, np.pad(image, ((0, 2), (0, 2)), mode="reflect"))
    np.testing.assert_array_equal(host(pad_to(backend.asarray(image), (3, 4))), image)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to(backend.asarray(image), (2, 4))
