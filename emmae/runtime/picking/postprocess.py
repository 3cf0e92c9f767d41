"""Particle region -> candidate centres with scores (method section 4), on the host.

The binary latent map is smoothed (3x3 box sum, zero padding, divided by its
maximum), upsampled bilinearly x2 (the reference's 512 grid for a 256 map), and
thresholded at the highest of ``threshold_levels`` levels in [1, 0] above which more
than ``area_fraction`` of the map lies (the area prior; the lowest positive level for
a sparse micrograph that never reaches it). Each 4-connected component
becomes a candidate: centre = intensity-weighted centroid, score = its area over the
area of a particle disk. Neighbour suppression keeps the higher-scoring of two
candidates closer than the minimum distance (ties: the first in scan order, never
both removed); candidates too close to the border are dropped; optionally, only
those above a score and the top fraction by score are kept (``min_score``,
``keep_fraction``, for re-thresholding after picking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from emmae.config import PostprocessConfig

UPSAMPLE = 2


@dataclass(frozen=True)
class Candidates:
    """Candidate centres on the working grid: ``xy [N, 2]`` (x = column, y = row) and ``score [N]``."""

    xy: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, keep: np.ndarray) -> Candidates:
        return Candidates(self.xy[keep], self.score[keep])


def particle_map(region: np.ndarray) -> np.ndarray:
    """Smoothed, normalised, x2 upsampled particle map ``[2h, 2w]`` in [0, 1]."""
    counts = ndi.uniform_filter(region.astype(np.float32), size=3, mode="constant") * 9
    peak = counts.max()
    smooth = counts / peak if peak > 0 else counts
    h, w = region.shape
    rows = (np.arange(UPSAMPLE * h) + 0.5) / UPSAMPLE - 0.5  # align_corners=False sample positions
    cols = (np.arange(UPSAMPLE * w) + 0.5) / UPSAMPLE - 0.5
    grid = np.meshgrid(np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), indexing="ij")
    return ndi.map_coordinates(smooth, grid, order=1, mode="nearest").astype(np.float32)


def area_threshold(values: np.ndarray, area_fraction: float, levels: int) -> float | None:
    """The highest level in ``linspace(1, 0, levels)`` exceeded by more than ``area_fraction`` of ``values``.

    A sparse micrograph, whose particle map never covers that much, gets the lowest
    positive level instead (the reference returns no picks there); None only for an
    empty map.
    """
    grid = np.linspace(1.0, 0.0, levels)
    for level in grid:
        if np.mean(values > level) > area_fraction:
            return float(level)
    lowest = float(grid[-2])
    return lowest if np.any(values > lowest) else None


def candidates(region: np.ndarray, patch_px: int, diameter_grid_px: float, config: PostprocessConfig) -> Candidates:
    """All candidate centres (grid pixels) of a particle region ``[h, w]`` of latents."""
    values = particle_map(region)
    level = area_threshold(values, config.area_fraction, config.threshold_levels)
    if level is None:
        return Candidates(np.zeros((0, 2)), np.zeros(0))
    components, count = ndi.label(values > level)  # 4-connected
    if count == 0:
        return Candidates(np.zeros((0, 2)), np.zeros(0))
    index = np.arange(1, count + 1)
    centres = np.asarray(ndi.center_of_mass(values, components, index), dtype=np.float64).reshape(-1, 2)  # (row, col)
    areas = ndi.sum_labels(np.ones_like(values), components, index)
    step = patch_px / UPSAMPLE  # grid pixels per map pixel
    xy = (centres[:, ::-1] + 0.5) * step - 0.5
    disk = np.pi * (diameter_grid_px / 2 / step) ** 2
    return Candidates(xy=xy, score=np.asarray(areas, dtype=np.float64) / disk)


def suppress_neighbours(found: Candidates, min_distance: float) -> Candidates:
    """Keep candidates in descending score; drop any within ``min_distance`` of one already kept."""
    if len(found) == 0 or min_distance <= 0:
        return found
    order = np.lexsort((np.arange(len(found)), -found.score))  # score descending, then scan order
    tree = cKDTree(found.xy)
    removed = np.zeros(len(found), dtype=bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        removed[tree.query_ball_point(found.xy[i], r=min_distance - 1e-9)] = True
    return found.take(np.sort(np.asarray(keep, dtype=int)))


def drop_border(found: Candidates, valid_shape: tuple[int, int], margin: float) -> Candidates:
    """Drop candidates closer than ``margin`` to the edge of the valid (unpadded) grid region."""
    h, w = valid_shape
    x, y = found.xy[:, 0], found.xy[:, 1]
    inside = (x >= margin - 0.5) & (y >= margin - 0.5) & (x <= w - 0.5 - margin) & (y <= h - 0.5 - margin)
    return found.take(np.flatnonzero(inside))


def keep_best(found: Candidates, min_score: float, keep_fraction: float) -> Candidates:
    """Candidates scoring at least ``min_score``, then the top ``keep_fraction`` of them by score (ties: scan order)."""
    found = found.take(np.flatnonzero(found.score >= min_score))
    if keep_fraction >= 1.0 or len(found) == 0:
        return found
    count = int(np.ceil(keep_fraction * len(found)))
    order = np.lexsort((np.arange(len(found)), -found.score))
    return found.take(np.sort(order[:count]))


def drop_clumps(found: Candidates, overlap_px: float, size: int) -> Candidates:
    """Drop every candidate of a clump: ``size`` or more candidates linked by centre distances under ``overlap_px``.

    Particles are solid: three or more that overlap are an aggregate, not particles.
    """
    if len(found) < size or size < 2 or overlap_px <= 0:
        return found
    pairs = cKDTree(found.xy).query_pairs(r=overlap_px, output_type="ndarray")
    if len(pairs) == 0:
        return found
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(found), len(found)))
    _, labels = connected_components(graph, directed=False)
    counts = np.bincount(labels)
    return found.take(np.flatnonzero(counts[labels] < size))


def picks(found: Candidates, diameter_grid_px: float, valid_shape: tuple[int, int], config: PostprocessConfig) -> Candidates:
    """Suppression by the minimum distance, aggregates, the border margin (all in diameters), then the score cut-offs."""
    kept = suppress_neighbours(found, config.min_distance_diameters * diameter_grid_px)
    kept = drop_clumps(kept, config.clump_diameters * diameter_grid_px, config.clump_size)
    kept = drop_border(kept, valid_shape, config.border_diameters * diameter_grid_px)
    return keep_best(kept, config.min_score, config.keep_fraction)
