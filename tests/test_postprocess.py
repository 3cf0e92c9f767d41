"""Post-processing: area-prior threshold, components, suppression, border."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.config import PostprocessConfig
from emmae.runtime.picking.postprocess import (
    Candidates,
    area_threshold,
    candidates,
    drop_border,
    keep_best,
    particle_map,
    picks,
    suppress_neighbours,
)


def test_area_threshold_is_the_highest_level_over_the_prior():
    values = np.linspace(0, 1, 1000, endpoint=False)
    level = area_threshold(values, 0.04, 30)
    assert np.mean(values > level) > 0.04
    finer = np.linspace(1, 0, 30)
    higher = finer[finer > level]
    assert all(np.mean(values > h) <= 0.04 for h in higher)
    assert area_threshold(np.zeros(100), 0.04, 30) is None
    sparse = np.zeros(1000)
    sparse[:10] = 0.9  # 1 % of the map: below the prior, still picked at the lowest positive level
    assert area_threshold(sparse, 0.04, 30) == pytest.approx(1 / 29)


def test_particle_map_upsamples_and_normalises():
    region = np.zeros((16, 16), bool)
    region[4:7, 9:12] = True
    values = particle_map(region)
    assert values.shape == (32, 32) and 0.8 < values.max() <= 1.0  # normalised before upsampling
    row, col = np.unravel_index(values.argmax(), values.shape)
    assert (row, col) in {(10, 20), (10, 21), (11, 20), (11, 21)}  # centre (5, 10) x2 + 0.5


def test_candidates_land_on_blobs_in_grid_pixels():
    region = np.zeros((64, 64), bool)  # latents of a 256-px grid (patch 4)
    blobs = [(10, 40), (30, 12), (50, 50)]  # (row, col) in latents
    for r, c in blobs:
        region[r - 2 : r + 3, c - 2 : c + 3] = True
    found = candidates(region, 4, 20.0, PostprocessConfig(area_fraction=0.01))
    assert len(found) == 3
    expected = np.array([[(c + 0.5) * 4 - 0.5, (r + 0.5) * 4 - 0.5] for r, c in blobs])  # x = column
    order = np.argsort(found.xy[:, 1])
    np.testing.assert_allclose(found.xy[order], expected[np.argsort(expected[:, 1])], atol=0.6)
    assert np.all(found.score > 0)


def test_suppression_keeps_the_best_and_never_both():
    found = Candidates(np.array([[0.0, 0.0], [5.0, 0.0], [30.0, 0.0], [33.0, 0.0]]), np.array([1.0, 2.0, 3.0, 3.0]))
    kept = suppress_neighbours(found, 10.0)
    np.testing.assert_array_equal(kept.xy, [[5.0, 0.0], [30.0, 0.0]])  # a tie keeps the first
    rng = np.random.default_rng(0)
    crowd = Candidates(rng.uniform(0, 200, (500, 2)), rng.integers(0, 5, 500).astype(float))
    kept = suppress_neighbours(crowd, 12.0)
    d = np.linalg.norm(kept.xy[:, None] - kept.xy[None], axis=-1) + np.eye(len(kept)) * 1e9
    assert d.min() >= 12.0 and len(kept) > 50


def test_border_margin_and_picks():
    found = Candidates(np.array([[5.0, 50.0], [50.0, 50.0], [95.0, 50.0], [50.0, 3.0]]), np.ones(4))
    kept = drop_border(found, (100, 100), 10.0)
    np.testing.assert_array_equal(kept.xy, [[50.0, 50.0]])
    both = picks(found, 20.0, (100, 100), PostprocessConfig(min_distance_diameters=0.5, border_diameters=0.5))
    np.testing.assert_array_equal(both.xy, [[50.0, 50.0]])


def test_score_cut_offs_keep_the_best_and_never_bring_back_suppressed_picks():
    found = Candidates(np.array([[20.0, 50.0], [25.0, 50.0], [50.0, 50.0], [80.0, 50.0], [50.0, 80.0]]), np.array([0.5, 0.9, 0.2, 0.4, 0.4]))
    np.testing.assert_array_equal(keep_best(found, 0.3, 1.0).score, [0.5, 0.9, 0.4, 0.4])
    np.testing.assert_array_equal(keep_best(found, 0.0, 0.4).score, [0.5, 0.9])  # ceil(0.4 * 5) = 2
    np.testing.assert_array_equal(keep_best(found, 0.0, 0.6).xy, [[20.0, 50.0], [25.0, 50.0], [80.0, 50.0]])  # tie: scan order
    config = PostprocessConfig(min_distance_diameters=0.5, border_diameters=0.1, keep_fraction=0.5)
    kept = picks(found, 20.0, (100, 100), config)  # (25, 50) suppresses (20, 50) first; then the top half of 4
    np.testing.assert_array_equal(kept.score, [0.9, 0.4])
