"""Per-micrograph clustering: latent smoothing, the reference selection rule, the hierarchy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from emmae.config import ClusterConfig
from emmae.runtime.picking.cluster import particle_region, select_cluster, smooth_latents, smoothing_window
from emmae.runtime.kernels.filters import box_kernel


@pytest.mark.parametrize("window", [2, 4])
def test_smoothing_matches_scipy_and_has_no_zero_rim(backend, host, rng, window):
    latents = rng.normal(size=(20, 24, 6)).astype(np.float32)
    kernel = box_kernel(float(window)).astype(np.float64)
    expected = ndi.correlate1d(ndi.correlate1d(latents.astype(np.float64), kernel, 0, mode="mirror"), kernel, 1, mode="mirror")
    out = host(smooth_latents(backend.asarray(latents), window))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    constant = np.ones((10, 10, 3), np.float32)
    np.testing.assert_allclose(host(smooth_latents(backend.asarray(constant), window)), constant, atol=1e-6)


def test_smoothing_window():
    assert smoothing_window(28, 4) == 2  # 7 latents across
    assert smoothing_window(32, 4) == 4
    assert smoothing_window(56, 4) == 4  # the reference would use 2 below 64 grid px
    assert smoothing_window(224, 4) == 4


def test_select_cluster_rule():
    labels = np.zeros((20, 20), int)
    labels[5:10, 5:10] = 1  # overlaps the reference most
    labels[12:14, 12:14] = 2  # small, fully inside the reference: purer
    reference = np.zeros((20, 20), bool)
    reference[5:10, 5:10] = True
    reference[12:14, 12:14] = True
    # overlap: 1 -> 25, 2 -> 4; size/overlap: 1 -> 1.0, 2 -> 1.0 (not smaller): keep 1
    assert select_cluster(labels, 3, reference, 0.0) == 1
    labels[0:2, :] = 1  # cluster 1 grows outside the reference: now less pure than 2
    assert select_cluster(labels, 3, reference, 0.0) == 2
    assert select_cluster(labels, 3, np.zeros((20, 20), bool), 0.0) is None


def test_hierarchy_finds_the_particle_region(backend, host, rng):
    """Three kinds of latents: background, particles (disks) and a third texture."""
    h = w = 64
    yy, xx = np.indices((h, w))
    particles = np.zeros((h, w), bool)
    for cy, cx in [(16, 16), (16, 44), (44, 30), (30, 52)]:
        particles |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
    other = (xx < 8) & ~particles
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], np.float32)
    kind = np.where(particles, 1, np.where(other, 2, 0))
    latents = (centres[kind] + rng.normal(0, 0.5, (h, w, 3))).astype(np.float32)
    region = host(particle_region(backend.asarray(latents), centres, 1, 2, ClusterConfig(fit_points=2048)))
    assert region.shape == (h, w)
    agreement = (region == particles).mean()
    assert agreement > 0.97
    assert region[particles].mean() > 0.9


@pytest.mark.parametrize("width", [1.0, 2.0, 3.0, 4.0, 5.5])
@pytest.mark.parametrize("shape", [(40, 33, 16), (3, 5, 2), (2, 6, 3), (1, 4, 2)])
def test_latent_smoothing_is_ndimage_to_the_bit(width, shape):
    latents = np.random.default_rng(int(width * 10) + shape[0]).normal(size=shape).astype(np.float32)
    kernel = box_kernel(width).astype(np.float32)
    expected = ndi.correlate1d(ndi.correlate1d(latents, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    got = smooth_latents(latents, width)
    assert got.dtype == np.float32 and np.array_equal(got, expected)  # rows summed at once, with ndimage's arithmetic
