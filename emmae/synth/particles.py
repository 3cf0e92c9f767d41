"""Particle density: 3-D blob "species" seen in random orientations, rendered as projections.

Owns the particles' shapes (one to three species of sums of isotropic 3-D Gaussians
per micrograph), their uniformly random orientations, rendering each particle's
projected density as a patch at its centre, and :func:`add_patches`, the clipped
patch adder the junk rendering uses too. Where the particles go is :mod:`.layout`'s.
"""

from __future__ import annotations

import math

import numpy as np

from emmae.synth.params import SynthParams

PATCH = 1.3  #: side of a particle's render patch, in diameters


def _species(p: SynthParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-3 blob shapes: centres [S, 12, 3], sigmas [S, 12], 2-D peak amplitudes [S, 12] (0 = unused)."""
    n_species, k_max, d = int(rng.integers(1, 4)), 12, p.diameter_px
    sigma = rng.uniform(0.12, 0.2, (n_species, k_max)) * d
    direction = rng.standard_normal((n_species, k_max, 3))
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    reach = np.minimum(0.35 * d, PATCH / 2 * d - 2.5 * sigma)  # wide ones nearer the middle: fit the patch
    r = reach * rng.uniform(0, 1, (n_species, k_max)) ** (1 / 3)  # uniform in a ball
    mass = rng.uniform(0.5, 1.5, (n_species, k_max)) * sigma**2
    mass[np.arange(k_max) >= rng.integers(6, k_max + 1, (n_species, 1))] = 0
    mass *= np.pi * p.radius_px**2 / mass.sum(axis=1, keepdims=True)  # mean over a disk = 1
    return direction * r[..., None], sigma, mass / (2 * np.pi * sigma**2)


def _rotations_xy(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 2, 3]: the x and y rows of uniformly random rotation matrices."""
    q = rng.standard_normal((4, n))
    w, x, y, z = q / np.linalg.norm(q, axis=0)  # uniform unit quaternions
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
    ]
    return np.array(rows).transpose(2, 0, 1)


def render_particles(p: SynthParams, rng: np.random.Generator, xy: np.ndarray) -> np.ndarray:
    """Projected density [ny, nx], float32: every particle's patch added at its centre."""
    density = np.zeros(p.shape, dtype=np.float32)
    if len(xy) == 0:
        return density
    centres, sigma, amp = _species(p, rng)
    kind = rng.integers(len(sigma), size=len(xy))
    offsets = np.einsum("pij,pkj->pki", _rotations_xy(rng, len(xy)), centres[kind])  # [P, K, 2] (x, y)
    size = math.ceil(PATCH * p.diameter_px) | 1
    origin = np.floor(xy).astype(np.int64) - size // 2  # [P, 2] patch corner (x, y)
    local = (xy[:, None, :] + offsets - origin[:, None, :]).astype(np.float32)  # [P, K, 2] in the patch
    inv_2s2 = (-0.5 / sigma[kind] ** 2).astype(np.float32)[..., None]  # [P, K, 1]
    amp = amp[kind].astype(np.float32)[..., None]
    for chunk in np.array_split(np.arange(len(xy)), max(1, len(xy) // 256)):
        gx, gy = (_gaussians(local[chunk, :, i], inv_2s2[chunk], size) for i in (0, 1))  # [C, K, size]
        gy *= amp[chunk]
        add_patches(density, np.matmul(gy.transpose(0, 2, 1), gx), origin[chunk])  # [C, size(y), size(x)]
    return density


def _gaussians(mu: np.ndarray, inv_2s2: np.ndarray, size: int) -> np.ndarray:
    """[C, K, size] float32 ``exp(inv_2s2 * (i - mu)^2)`` for pixel i of the patch."""
    g = np.arange(size, dtype=np.float32) - mu[..., None]
    g *= g
    g *= inv_2s2
    return np.exp(g, out=g)


def add_patches(canvas: np.ndarray, patches: np.ndarray, origin_xy: np.ndarray) -> None:
    """Add patches [P, h, w] into canvas [ny, nx] at integer corners [P, 2] (x, y), clipped."""
    h, w = patches.shape[1:]
    ny, nx = canvas.shape
    x0, y0 = np.clip(origin_xy[:, 0], 0, nx), np.clip(origin_xy[:, 1], 0, ny)
    x1, y1 = np.clip(origin_xy[:, 0] + w, 0, nx), np.clip(origin_xy[:, 1] + h, 0, ny)
    px, py = x0 - origin_xy[:, 0], y0 - origin_xy[:, 1]
    bounds = np.stack([y0, y1, x0, x1, py, px], axis=1).tolist()
    for patch, (a, b, c, d, u, v) in zip(patches, bounds, strict=True):
        canvas[a:b, c:d] += patch[u : u + b - a, v : v + d - c]
