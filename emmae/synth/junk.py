"""Junk: carbon film, contaminants (ice chunks or dark round objects) and particle aggregates.

Owns drawing the junk clear of given centres (:class:`Features`, which also answers
which disks touch junk), rendering its phase density and opacity (carbon texture,
Fresnel-fringed ice chunks, aggregate clumps), the opacity of dark round objects
scaled to the particles' contrast, and the boolean junk mask stored as truth. None of
the junk ever holds a particle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.spatial import KDTree

from emmae.synth.imaging import gaussian_field
from emmae.synth.params import MAX_RMS_CONTRAST, SynthParams
from emmae.synth.particles import add_patches, render_particles

# __package__, not __name__: records keep the logger name "emmae.synth" they had before the split.
log = logging.getLogger(__package__)

CARBON_OPACITY, CARBON_DENSITY, CARBON_TEXTURE = 0.3, 1.5, 0.6
CONTAMINANT_OPACITY, CONTAMINANT_DENSITY = 0.85, 3.0
FEATURE_TRIES = 50


@dataclass(frozen=True)
class Features:
    """Carbon film (``x cos + y sin > offset``), contaminants and aggregates; none hold particles."""

    carbon: tuple[float, float, float] | None  # (cos, sin, offset_px)
    edge_px: float  # soft-edge width of carbon and contaminants
    blobs: np.ndarray  # float64 [M, 10]: x, y, radius, 3 harmonic amplitudes, 3 phases, relative darkness
    aggregates: list[np.ndarray]  # each [m, 2]: the member particles' centres of one clump
    member_radius: float  # an aggregate member's radius

    @cached_property
    def blob_patches(self) -> list[tuple[np.ndarray, np.ndarray]]:  # rendered once: density, opacity and the junk mask use them
        return _blob_patches(self)

    def blob_reach(self) -> np.ndarray:  # [M] outermost radius of each contaminant
        return self.blobs[:, 2] * (1 + self.blobs[:, 3:6].sum(axis=1)) + self.edge_px / 2

    def excluded(self, xy: np.ndarray, radius_px: float) -> np.ndarray:
        """[N] True where a disk of ``radius_px`` at ``xy`` [N, 2] touches a feature."""
        out = np.zeros(len(xy), dtype=bool)
        if self.carbon is not None:
            c, s, offset = self.carbon
            out |= xy[:, 0] * c + xy[:, 1] * s > offset - radius_px - self.edge_px / 2
        for (bx, by), reach in zip(self.blobs[:, :2], self.blob_reach(), strict=True):
            out |= np.hypot(xy[:, 0] - bx, xy[:, 1] - by) < reach + radius_px
        for members in self.aggregates:
            out |= KDTree(members).query(xy)[0] < self.member_radius + radius_px
        return out


def draw_features(p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray) -> Features:
    """Carbon and contaminants clear of ``fixed_xy`` [N, 2]; one that cannot be is left out (logged)."""
    edge = 0.15 * p.diameter_px
    carbon = _draw_carbon(p, rng, fixed_xy, edge) if p.carbon_edge else None
    blobs = [_draw_blob(p, rng, fixed_xy, edge) for _ in range(p.n_contaminants)]
    blobs = [b for b in blobs if b is not None]
    features = Features(carbon, edge, np.array(blobs, dtype=np.float64).reshape(-1, 10), [], p.radius_px)
    for _ in range(p.n_aggregates):
        members = _draw_aggregate(p, rng, fixed_xy, features)
        if members is not None:
            features.aggregates.append(members)
    return features


def _draw_aggregate(p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray, features: Features) -> np.ndarray | None:
    """[m, 2] centres of 5-10 overlapping particles (0.5-0.8 diameters apart) clear of everything drawn so far, or None."""
    ny, nx = p.shape
    for _ in range(FEATURE_TRIES):
        count = int(rng.integers(5, 11))
        steps = rng.uniform(0.5, 0.8, count - 1) * p.diameter_px
        angles = rng.uniform(0, 2 * np.pi, count - 1)
        walk = np.cumsum(np.stack([steps * np.cos(angles), steps * np.sin(angles)], axis=1), axis=0)
        members = rng.uniform((2 * p.diameter_px,) * 2, (nx - 2 * p.diameter_px, ny - 2 * p.diameter_px)) + np.vstack([[0, 0], walk])
        inside = (members >= p.radius_px).all() and (members[:, 0] < nx - p.radius_px).all() and (members[:, 1] < ny - p.radius_px).all()
        clear = not features.excluded(members, p.radius_px).any() and (len(fixed_xy) == 0 or KDTree(members).query(fixed_xy)[0].min() > p.diameter_px)
        if inside and clear:
            return members
    log.warning("no room for an aggregate clear of the given centres; one fewer")
    return None


def _draw_carbon(
    p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray, edge: float
) -> tuple[float, float, float] | None:
    """(cos, sin, offset): carbon on 15-40% of the image area (at least 5% with ``fixed_xy``)."""
    ny, nx = p.shape
    grid = np.stack(np.meshgrid(np.linspace(0, nx - 1, 64), np.linspace(0, ny - 1, 64)), axis=-1).reshape(-1, 2)
    for _ in range(FEATURE_TRIES):
        theta, frac = rng.uniform(0, 2 * np.pi), rng.uniform(*p.carbon_fraction)
        c, s = math.cos(theta), math.sin(theta)
        proj = grid @ (c, s)
        clear = float((fixed_xy @ (c, s)).max(initial=-np.inf)) + p.radius_px + edge / 2
        offset = max(float(np.quantile(proj, 1 - frac)), clear)
        if np.mean(proj > offset) >= 0.05:
            return c, s, offset
    log.warning("no room for a carbon edge clear of the given centres; micrograph has none")
    return None


def _draw_blob(p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray, edge: float) -> np.ndarray | None:
    """[10] one contaminant ``contaminant_width_diameters`` across (see :class:`Features`), or None."""
    ny, nx = p.shape
    lo, hi = p.contaminant_width_diameters
    for _ in range(FEATURE_TRIES):
        centre, radius = rng.uniform((0, 0), (nx, ny)), rng.uniform(lo / 2, hi / 2) * p.diameter_px
        darkness = 0.0 if p.contaminant_contrast is None else rng.uniform(*p.contaminant_contrast)
        blob = np.r_[centre, radius, rng.uniform(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3), darkness]
        reach = blob[2] * (1 + blob[3:6].sum()) + edge / 2
        if not np.any(np.hypot(*(fixed_xy - blob[:2]).T) < reach + p.radius_px):
            return blob
    log.warning("no room for a contaminant clear of the given centres; one fewer")
    return None


def _carbon_mask(p: SynthParams, f: Features) -> np.ndarray:
    """[ny, nx] float32 in [0, 1]: 1 on the carbon film, a linear soft edge ``f.edge_px`` wide."""
    c, s, offset = f.carbon  # type: ignore[misc]
    ny, nx = p.shape
    rows = np.arange(ny, dtype=np.float32) * np.float32(s / f.edge_px)  # [ny]
    cols = np.arange(nx, dtype=np.float32) * np.float32(c / f.edge_px) + np.float32(0.5 - offset / f.edge_px)
    mask = rows[:, None] + cols  # signed distance to the edge, in edge widths, + 0.5
    return np.clip(mask, 0, 1, out=mask)


def _blob_patches(f: Features) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each contaminant as (mask [h, w] float32 in [0, 1], integer corner (x, y)): irregular, soft-edged."""
    out = []
    for blob, reach in zip(f.blobs, f.blob_reach(), strict=True):
        half = math.ceil(reach) + 1
        corner = np.floor(blob[:2]).astype(np.int64) - half
        grid = np.arange(2 * half + 1)
        dx, dy = corner[0] + grid[None, :] - blob[0], corner[1] + grid[:, None] - blob[1]
        phi = np.arctan2(dy, dx)
        wobble = sum(a * np.cos(k * phi + ph) for k, a, ph in zip((2, 3, 5), blob[3:6], blob[6:9], strict=True))
        rim = blob[2] * (1 + wobble)  # [h, w] radius of the edge in each direction
        t = np.clip((rim - np.hypot(dx, dy)) / f.edge_px + 0.5, 0, 1)
        out.append(((t * t * (3 - 2 * t)).astype(np.float32), corner))
    return out


def feature_maps(p: SynthParams, rng: np.random.Generator, f: Features) -> tuple[np.ndarray, np.ndarray] | None:
    """(phase density, opacity) [ny, nx] float32 of carbon, ice-chunk contaminants and aggregates, or None without any.

    Dark round objects (``contaminant_contrast``) are not here: their opacity needs the
    particles' contrast (:func:`dark_objects`).
    """
    chunks = [(patch, corner) for (patch, corner), blob in zip(f.blob_patches, f.blobs, strict=True) if blob[9] == 0]
    if f.carbon is None and not chunks and not f.aggregates:
        return None
    if f.carbon is None:
        density, opacity = np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32)
    else:
        opacity = _carbon_mask(p, f)
        density = gaussian_field(rng, p.shape)  # amorphous carbon texture
        density *= np.float32(CARBON_DENSITY * CARBON_TEXTURE)
        density += np.float32(CARBON_DENSITY)
        density *= opacity
        opacity *= np.float32(CARBON_OPACITY)
    for patch, corner in chunks:
        add_patches(density, CONTAMINANT_DENSITY * patch[None], corner[None])
        add_patches(opacity, CONTAMINANT_OPACITY * patch[None], corner[None])
    for members in f.aggregates:
        density += render_particles(p, rng, members)
    if chunks:
        np.minimum(opacity, 0.95, out=opacity)
    return density, opacity


def dark_objects(p: SynthParams, f: Features, contrast: np.ndarray, xy: np.ndarray) -> np.ndarray | None:
    """Opacity [ny, nx] of the dark round objects: each darkens ``blob[9]`` times the particles' mean darkening, or None."""
    dark = [(patch, corner, blob[9]) for (patch, corner), blob in zip(f.blob_patches, f.blobs, strict=True) if blob[9] > 0]
    if not dark:
        return None
    if len(xy):  # the particles' mean darkening over their central disks
        offsets = np.arange(-int(p.radius_px / 2), int(p.radius_px / 2) + 1)
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        disk = np.hypot(dx, dy) <= p.radius_px / 2
        rows = np.clip(np.round(xy[:, 1, None]).astype(int) + dy[disk][None], 0, p.shape[0] - 1)
        cols = np.clip(np.round(xy[:, 0, None]).astype(int) + dx[disk][None], 0, p.shape[1] - 1)
        darkening = max(float(-contrast[rows, cols].mean()), 1e-4)
    else:
        darkening = min(math.sqrt(p.snr / p.counts_per_px), MAX_RMS_CONTRAST)
    opacity = np.zeros(p.shape, np.float32)
    for patch, corner, factor in dark:
        add_patches(opacity, np.float32(min(factor * darkening, 0.95)) * patch[None], corner[None])
    return np.minimum(opacity, 0.95, out=opacity)


def junk_mask(p: SynthParams, f: Features) -> np.ndarray | None:
    """Bool [ny, nx]: carbon, contaminants (their soft edges half-way) and aggregate members' disks; None without junk."""
    if f.carbon is None and len(f.blobs) == 0 and not f.aggregates:
        return None
    mask = _carbon_mask(p, f) >= 0.5 if f.carbon is not None else np.zeros(p.shape, bool)
    for patch, corner in f.blob_patches:
        part = np.zeros(p.shape, np.float32)
        add_patches(part, patch[None], corner[None])
        mask |= part >= 0.5
    if f.aggregates:
        rows, cols = np.mgrid[0 : p.shape[0], 0 : p.shape[1]]
        members = np.concatenate(f.aggregates)
        near = KDTree(members).query(np.stack([cols.ravel(), rows.ravel()], axis=1), distance_upper_bound=f.member_radius)[0]
        mask |= np.isfinite(near).reshape(p.shape)
    return mask
