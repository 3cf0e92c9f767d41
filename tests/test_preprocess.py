"""The whole preprocessing pipeline: geometry, both modes, positions, real micrographs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from emmae.config import PreprocessConfig
from emmae.io.mrc import read_micrograph
from emmae.runtime.picking.preprocess import plan, preprocess, run_steps
from emmae.runtime.kernels.resize import resize


def _blob_image(shape, centres_xy, diameter, rng):
    yy, xx = np.indices(shape)
    image = rng.normal(0, 0.3, shape)
    for x, y in centres_xy:
        image -= np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (diameter / 4) ** 2))
    return image.astype(np.float32)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_output_geometry_and_range(backend, host, rng, mode):
    image = rng.normal(100, 10, (600, 900)).astype(np.float32)
    out = preprocess(backend.asarray(image), PreprocessConfig(mode=mode, grid_px=256), 40, backend)
    assert out.transform.valid_shape == (171, 256) and out.transform.padded_shape == (192, 256)
    result = host(out.image)
    assert result.shape == (192, 256) and result.dtype == np.float32
    assert result.min() >= 0 and result.max() <= 255 and result.max() > 200
    assert out.diameter_grid_px == pytest.approx(40 * 256 / 900, rel=1e-2)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_particles_stay_where_the_transform_says(rng, mode):
    """An asymmetric layout of dark blobs appears on the grid exactly where the transform maps it."""
    shape, diameter = (640, 960), 48.0
    centres = np.array([[150.0, 120.0], [700.0, 180.0], [420.0, 500.0]])  # x = column, y = row
    image = _blob_image(shape, centres, diameter, rng)
    out = preprocess(image, PreprocessConfig(mode=mode, grid_px=512), diameter)
    grid = out.image
    for x, y in out.transform.input_to_grid(centres):
        r = int(out.diameter_grid_px)
        window = grid[int(y) - r : int(y) + r + 1, int(x) - r : int(x) + r + 1]
        low = np.unravel_index(np.argmin(ndi.uniform_filter(window, 5)), window.shape)
        found = np.array([int(x) - r + low[1], int(y) - r + low[0]])  # window origin + darkest point
        assert np.hypot(*(found - [x, y])) < 0.15 * out.diameter_grid_px


def test_fast_and_reference_agree_on_a_binnable_micrograph(rng):
    """At 1x the two modes are the same computation."""
    image = rng.normal(0, 1, (256, 256)).astype(np.float32)
    config = dict(grid_px=256, gaussian_sigma_grid_px=1.5, gaussian_radius_grid_px=2, box_grid_px=6)
    fast = preprocess(image, PreprocessConfig(mode="fast", **config), 20).image
    reference = preprocess(image, PreprocessConfig(mode="reference", **config), 20).image
    np.testing.assert_allclose(fast, reference, atol=1e-3)


def test_steps_are_named_and_timed(rng):
    image = rng.normal(0, 1, (300, 300)).astype(np.float32)
    timings: dict[str, float] = {}
    _, steps = plan(image.shape, PreprocessConfig(grid_px=128), 24)
    run_steps(image, steps, timings)
    assert list(timings) == ["upload", "bin", "normalise", "gaussian", "clahe", "box", "pad"]
    _, ref_steps = plan(image.shape, PreprocessConfig(grid_px=128, mode="reference"), 24)
    assert [name for name, _ in ref_steps] == ["upload", "normalise", "gaussian", "clahe", "box", "resize", "pad"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D array"):
        preprocess(np.zeros((2, 8, 8), np.float32), PreprocessConfig(), 10)
    with pytest.raises(ValueError, match="must be positive"):
        preprocess(np.zeros((64, 64), np.float32), PreprocessConfig(grid_px=64), 0)
    with pytest.raises(ValueError, match="too small"):
        preprocess(np.zeros((4096, 4096), np.float32), PreprocessConfig(), 12)  # 3 px on the grid


def test_gpu_matches_cpu(backend, host, rng):
    image = _blob_image((512, 700), np.array([[200.0, 150.0], [500.0, 300.0]]), 40.0, rng)
    config = PreprocessConfig(grid_px=256)
    cpu = preprocess(image, config, 40.0).image
    out = host(preprocess(backend.asarray(image), config, 40.0, backend).image)
    assert np.abs(out - cpu).max() <= 2.0  # grey levels: CLAHE rounding may differ by one level


@pytest.mark.real
def test_every_real_micrograph_preprocesses(real_micrographs):
    for path, diameter in real_micrographs:
        mic = read_micrograph(path)
        for mode in ("fast", "reference"):
            out = preprocess(mic.data, PreprocessConfig(mode=mode), diameter)
            assert out.image.shape == (1024, 1024), path
            assert np.isfinite(out.image).all() and out.image.std() > 10, path


@pytest.mark.real
@pytest.mark.slow
def test_fast_mode_matches_reference_mode_on_real_micrographs(real_micrographs):
    """Real micrographs enlarged 2x (with fine noise, like a finer camera): binning first changes little."""
    rng = np.random.default_rng(0)
    for path, diameter in real_micrographs[::3]:
        small = read_micrograph(path).data
        large = resize(small, (2048, 2048), "cubic")
        large += rng.normal(0, large.std(), large.shape).astype(np.float32)
        fast = preprocess(large, PreprocessConfig(mode="fast"), 2 * diameter).image
        reference = preprocess(large, PreprocessConfig(mode="reference"), 2 * diameter).image
        correlation = np.corrcoef(fast.ravel(), reference.ravel())[0, 1]
        assert correlation > 0.99, (path, correlation)
        assert np.abs(fast - reference).mean() < 8.0, path  # grey levels of 255
