"""Synthetic cryo-EM micrographs with particles at known centres.

Used by tests, the demo and benchmarks. Image formation, in order:

1. Projected density: each particle is the projection of a smooth 3-D blob (a sum
   of isotropic 3-D Gaussians, so its projection is a sum of 2-D Gaussians) in a
   random orientation. One to three blob "species" per micrograph, like one protein
   seen in many orientations. Density is normalised so that the mean projected
   density over a particle disk is 1.
2. Phase contrast: the density's spectrum times the CTF
   ``-(sqrt(1-A^2) sin(chi) + A cos(chi)) * exp(-B k^2 / 4)`` (Cs 2.7 mm). The
   transform is periodic, so CTF delocalisation wraps around the edges. Low spatial
   frequencies have a negative CTF, so protein is darker than the background.
3. Background: ``dose * pixel_size^2`` counts per pixel, modulated by the relative
   ice thickness (a linear ramp in a random direction plus a very low-frequency
   component); carbon film and contaminants absorb electrons (darker) and add
   phase density of their own (Fresnel fringes, carbon texture).
4. Shot noise: Gaussian approximation of Poisson noise, std ``sqrt(expected counts)``.

SNR: the signal energy of all particles (after the CTF, in counts) per pixel of
particle-disk area, divided by the noise variance at the mean dose. The particle
contrast is set to give the requested SNR under plain Poisson noise at the given
dose; when that would need more than ``MAX_RMS_CONTRAST`` rms contrast, the contrast
stays there and the noise is scaled down instead.

Truth is complete: carbon film and contaminants never hold particles, so every
particle in the image is in ``centres_xy``. Coordinates are ``(x, y)`` = (column,
row), 0-based pixel centres; images are ``data[row, col]``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft
from scipy.spatial import KDTree

from emmae.errors import OutputError
from emmae.io.mrc import write_micrograph
from emmae.io.star import write_star

log = logging.getLogger(__name__)

CS_A = 2.7e7  #: spherical aberration, 2.7 mm in Angstrom
PACKING = 0.35  #: default fraction of the free area covered by particle disks
MIN_SEPARATION = 1.05  #: minimum centre distance, in diameters
PATCH = 1.3  #: side of a particle's render patch, in diameters
RSA_JAMMING = 0.547  #: jamming coverage of random sequential adsorption of disks
MAX_RMS_CONTRAST = 0.2  #: rms particle contrast cap (see the module docstring)
CARBON_OPACITY, CARBON_DENSITY, CARBON_TEXTURE = 0.3, 1.5, 0.6
CONTAMINANT_OPACITY, CONTAMINANT_DENSITY = 0.85, 3.0
NOISE_BLOCKS = 16  #: row blocks of random numbers; fixed so results never depend on CPUs
FEATURE_TRIES = 50


@dataclass(frozen=True)
class SynthParams:
    """Physical and layout parameters of a synthetic micrograph.

    ``n_particles=None`` packs ~35% of the free area; ``border_px=None`` keeps
    centres one radius from the edge. ``snr`` is defined in the module docstring.

    Raises:
        ValueError: on construction, for any invalid value; the message names the field.
    """

    shape: tuple[int, int] = (1024, 1024)  # (ny, nx)
    diameter_px: float = 56.0
    pixel_size_A: float = 1.0
    n_particles: int | None = None
    snr: float = 0.05
    defocus_um: float = 1.5
    voltage_kV: float = 300
    amplitude_contrast: float = 0.07
    b_factor_A2: float = 100
    dose_e_per_A2: float = 40
    ice_gradient: float = 0.2
    carbon_edge: bool = False
    carbon_fraction: tuple[float, float] = (0.15, 0.4)  # share of the image the carbon film covers (drawn in this range)
    n_contaminants: int = 0
    contaminant_width_diameters: tuple[float, float] = (1.0, 4.0)  # contaminant width, in particle diameters
    # None: ice chunks (opaque, with phase density); (lo, hi): dark round objects that darken the image
    # lo..hi times as much as the particles do on average (no phase density)
    contaminant_contrast: tuple[float, float] | None = None
    n_aggregates: int = 0  # clumps of 5-10 overlapping particles: junk, not in the truth
    border_px: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def radius_px(self) -> float:
        return self.diameter_px / 2

    @property
    def margin_px(self) -> float:
        """Minimum distance of a centre from the image edge, in pixels."""
        return self.radius_px if self.border_px is None else float(self.border_px)

    @property
    def counts_per_px(self) -> float:
        """Mean expected electron counts per pixel without specimen."""
        return self.dose_e_per_A2 * self.pixel_size_A**2


@dataclass(frozen=True, eq=False)
class SynthMicrograph:
    """A synthetic micrograph: ``image[row, col]`` and its particle centres ``(x, y)``."""

    image: np.ndarray  # float32 (or params.dtype) [ny, nx], expected counts plus noise
    centres_xy: np.ndarray  # float64 [N, 2], x = column, y = row
    params: SynthParams
    junk: np.ndarray | None = None  # bool [ny, nx]: carbon, contaminants and aggregates (None: no junk)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _validate(p: SynthParams) -> None:
    ints = isinstance(p.shape, tuple | list) and len(p.shape) == 2
    ints = ints and all(isinstance(n, int | np.integer) and n > 0 for n in p.shape)
    _require(ints, "shape", f"must be two positive ints (ny, nx), got {p.shape}")
    _require(math.isfinite(p.diameter_px) and p.diameter_px > 0, "diameter_px", f"must be > 0, got {p.diameter_px}")
    _require(min(p.shape) >= 2 * p.diameter_px, "shape", f"{p.shape} is smaller than 2 diameters of {p.diameter_px} px")
    _require(math.isfinite(p.pixel_size_A) and p.pixel_size_A > 0, "pixel_size_A", f"must be > 0, got {p.pixel_size_A}")
    _require(p.n_particles is None or p.n_particles >= 0, "n_particles", f"must be >= 0 or None, got {p.n_particles}")
    _require(p.n_contaminants >= 0, "n_contaminants", f"must be >= 0, got {p.n_contaminants}")
    _require(p.n_aggregates >= 0, "n_aggregates", f"must be >= 0, got {p.n_aggregates}")
    for name in ("carbon_fraction", "contaminant_width_diameters", "contaminant_contrast"):
        pair = getattr(p, name)
        ok = pair is None and name == "contaminant_contrast" or (len(pair) == 2 and 0 < pair[0] <= pair[1] and math.isfinite(pair[1]))
        _require(ok, name, f"must be a range (lo, hi) with 0 < lo <= hi, got {pair}")
    _require(p.carbon_fraction[1] <= 1, "carbon_fraction", f"must lie in (0, 1], got {p.carbon_fraction}")
    _require(p.snr > 0, "snr", f"must be positive, got {p.snr}")
    _require(p.defocus_um >= 0, "defocus_um", f"must be >= 0 (underfocus), got {p.defocus_um}")
    _require(p.voltage_kV > 0, "voltage_kV", f"must be positive, got {p.voltage_kV}")
    _require(0 <= p.amplitude_contrast < 1, "amplitude_contrast", f"must be in [0, 1), got {p.amplitude_contrast}")
    _require(p.b_factor_A2 >= 0, "b_factor_A2", f"must be >= 0, got {p.b_factor_A2}")
    _require(p.dose_e_per_A2 > 0, "dose_e_per_A2", f"must be positive, got {p.dose_e_per_A2}")
    _require(0 <= p.ice_gradient < 1, "ice_gradient", f"must be in [0, 1), got {p.ice_gradient}")
    limit = (min(p.shape) - 1) / 2
    ok = p.border_px is None or 0 <= p.border_px < limit
    _require(ok, "border_px", f"must be in [0, {limit}), got {p.border_px}")
    _require(p.dtype in ("float32", "float16"), "dtype", f"must be 'float32' or 'float16', got {p.dtype!r}")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Features:
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


def _draw_features(p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray) -> _Features:
    """Carbon and contaminants clear of ``fixed_xy`` [N, 2]; one that cannot be is left out (logged)."""
    edge = 0.15 * p.diameter_px
    carbon = _draw_carbon(p, rng, fixed_xy, edge) if p.carbon_edge else None
    blobs = [_draw_blob(p, rng, fixed_xy, edge) for _ in range(p.n_contaminants)]
    blobs = [b for b in blobs if b is not None]
    features = _Features(carbon, edge, np.array(blobs, dtype=np.float64).reshape(-1, 10), [], p.radius_px)
    for _ in range(p.n_aggregates):
        members = _draw_aggregate(p, rng, fixed_xy, features)
        if members is not None:
            features.aggregates.append(members)
    return features


def _draw_aggregate(p: SynthParams, rng: np.random.Generator, fixed_xy: np.ndarray, features: _Features) -> np.ndarray | None:
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
    """[10] one contaminant ``contaminant_width_diameters`` across (see :class:`_Features`), or None."""
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


def _place_particles(p: SynthParams, rng: np.random.Generator, features: _Features) -> np.ndarray:
    """[N, 2] random non-overlapping centres clear of the border and the features.

    Raises:
        ValueError: ``n_particles`` particles do not fit.
    """
    ny, nx = p.shape
    lo, hi = np.full(2, p.margin_px), np.array([nx - 1, ny - 1]) - p.margin_px
    box = np.prod(hi - lo)
    free_fraction = float(np.mean(~features.excluded(rng.uniform(lo, hi, (2048, 2)), p.radius_px)))
    free = box * free_fraction
    sep = MIN_SEPARATION * p.diameter_px
    n_jam = int(RSA_JAMMING * free * (1 + sep / math.sqrt(box)) ** 2 / (np.pi * sep**2 / 4))
    n = round(PACKING * free / (np.pi * p.radius_px**2)) if p.n_particles is None else p.n_particles
    _require(n <= n_jam, "n_particles", f"={n} do not fit {sep:.1f} px apart (at most ~{n_jam})")
    if n == 0:
        return np.zeros((0, 2))
    for per_particle in (6, 40):
        xy = rng.uniform(lo, hi, (int((per_particle * n + 64) / max(free_fraction, 0.01)), 2))
        xy = xy[~features.excluded(xy, p.radius_px)]
        xy = xy[_sequential_accept(xy, sep)]
        if len(xy) >= n:
            return xy[:n]
    raise ValueError(f"n_particles={n}: only {len(xy)} fit {sep:.1f} px apart; ask for fewer")


def _sequential_accept(xy: np.ndarray, min_dist: float) -> np.ndarray:
    """Indices (ascending) that random sequential adsorption in index order accepts.

    Equivalent to accepting points one by one when no accepted point is closer than
    ``min_dist``, resolved in parallel rounds over the conflict pairs.
    """
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = KDTree(xy).query_pairs(min_dist, output_type="ndarray")  # [P, 2], i < j
    lo, hi = pairs[:, 0], pairs[:, 1]
    state = np.zeros(len(xy), dtype=np.int8)  # 0 undecided, 1 accepted, -1 rejected
    while np.any(state == 0):
        waits, hit = np.zeros(len(xy), bool), np.zeros(len(xy), bool)
        waits[hi[state[lo] == 0]] = True
        hit[hi[state[lo] == 1]] = True
        undecided = state == 0
        state[undecided & hit] = -1
        state[undecided & ~hit & ~waits] = 1
    return np.flatnonzero(state == 1)


# --------------------------------------------------------------------------- density


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


def _render_particles(p: SynthParams, rng: np.random.Generator, xy: np.ndarray) -> np.ndarray:
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
        _add_patches(density, np.matmul(gy.transpose(0, 2, 1), gx), origin[chunk])  # [C, size(y), size(x)]
    return density


def _gaussians(mu: np.ndarray, inv_2s2: np.ndarray, size: int) -> np.ndarray:
    """[C, K, size] float32 ``exp(inv_2s2 * (i - mu)^2)`` for pixel i of the patch."""
    g = np.arange(size, dtype=np.float32) - mu[..., None]
    g *= g
    g *= inv_2s2
    return np.exp(g, out=g)


def _add_patches(canvas: np.ndarray, patches: np.ndarray, origin_xy: np.ndarray) -> None:
    """Add patches [P, h, w] into canvas [ny, nx] at integer corners [P, 2] (x, y), clipped."""
    h, w = patches.shape[1:]
    ny, nx = canvas.shape
    x0, y0 = np.clip(origin_xy[:, 0], 0, nx), np.clip(origin_xy[:, 1], 0, ny)
    x1, y1 = np.clip(origin_xy[:, 0] + w, 0, nx), np.clip(origin_xy[:, 1] + h, 0, ny)
    px, py = x0 - origin_xy[:, 0], y0 - origin_xy[:, 1]
    bounds = np.stack([y0, y1, x0, x1, py, px], axis=1).tolist()
    for patch, (a, b, c, d, u, v) in zip(patches, bounds, strict=True):
        canvas[a:b, c:d] += patch[u : u + b - a, v : v + d - c]


def _carbon_mask(p: SynthParams, f: _Features) -> np.ndarray:
    """[ny, nx] float32 in [0, 1]: 1 on the carbon film, a linear soft edge ``f.edge_px`` wide."""
    c, s, offset = f.carbon  # type: ignore[misc]
    ny, nx = p.shape
    rows = np.arange(ny, dtype=np.float32) * np.float32(s / f.edge_px)  # [ny]
    cols = np.arange(nx, dtype=np.float32) * np.float32(c / f.edge_px) + np.float32(0.5 - offset / f.edge_px)
    mask = rows[:, None] + cols  # signed distance to the edge, in edge widths, + 0.5
    return np.clip(mask, 0, 1, out=mask)


def _blob_patches(f: _Features) -> list[tuple[np.ndarray, np.ndarray]]:
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


def _feature_maps(p: SynthParams, rng: np.random.Generator, f: _Features) -> tuple[np.ndarray, np.ndarray] | None:
    """(phase density, opacity) [ny, nx] float32 of carbon, ice-chunk contaminants and aggregates, or None without any.

    Dark round objects (``contaminant_contrast``) are not here: their opacity needs the
    particles' contrast (:func:`_dark_objects`).
    """
    chunks = [(patch, corner) for (patch, corner), blob in zip(f.blob_patches, f.blobs, strict=True) if blob[9] == 0]
    if f.carbon is None and not chunks and not f.aggregates:
        return None
    if f.carbon is None:
        density, opacity = np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32)
    else:
        opacity = _carbon_mask(p, f)
        density = _gaussian_field(rng, p.shape)  # amorphous carbon texture
        density *= np.float32(CARBON_DENSITY * CARBON_TEXTURE)
        density += np.float32(CARBON_DENSITY)
        density *= opacity
        opacity *= np.float32(CARBON_OPACITY)
    for patch, corner in chunks:
        _add_patches(density, CONTAMINANT_DENSITY * patch[None], corner[None])
        _add_patches(opacity, CONTAMINANT_OPACITY * patch[None], corner[None])
    for members in f.aggregates:
        density += _render_particles(p, rng, members)
    if chunks:
        np.minimum(opacity, 0.95, out=opacity)
    return density, opacity


def _dark_objects(p: SynthParams, f: _Features, contrast: np.ndarray, xy: np.ndarray) -> np.ndarray | None:
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
        _add_patches(opacity, np.float32(min(factor * darkening, 0.95)) * patch[None], corner[None])
    return np.minimum(opacity, 0.95, out=opacity)


def _junk_mask(p: SynthParams, f: _Features) -> np.ndarray | None:
    """Bool [ny, nx]: carbon, contaminants (their soft edges half-way) and aggregate members' disks; None without junk."""
    if f.carbon is None and len(f.blobs) == 0 and not f.aggregates:
        return None
    mask = _carbon_mask(p, f) >= 0.5 if f.carbon is not None else np.zeros(p.shape, bool)
    for patch, corner in f.blob_patches:
        part = np.zeros(p.shape, np.float32)
        _add_patches(part, patch[None], corner[None])
        mask |= part >= 0.5
    if f.aggregates:
        rows, cols = np.mgrid[0 : p.shape[0], 0 : p.shape[1]]
        members = np.concatenate(f.aggregates)
        near = KDTree(members).query(np.stack([cols.ravel(), rows.ravel()], axis=1), distance_upper_bound=f.member_radius)[0]
        mask |= np.isfinite(near).reshape(p.shape)
    return mask


# --------------------------------------------------------------------------- optics


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Angstrom (300 kV -> 0.0197)."""
    volts = voltage_kV * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.97848e-6 * volts))


def ctf(p: SynthParams) -> np.ndarray:
    """[ny, nx // 2 + 1] float32 CTF with B-factor envelope, on the ``rfft2`` grid."""
    ny, nx = p.shape
    lam, defocus_A = electron_wavelength_A(p.voltage_kV), p.defocus_um * 1e4
    ky = (scipy.fft.fftfreq(ny) / p.pixel_size_A).astype(np.float32) ** 2
    kx = (scipy.fft.rfftfreq(nx) / p.pixel_size_A).astype(np.float32) ** 2
    k2 = ky[:, None] + kx  # [ny, nx//2+1] in 1/A^2
    chi = k2 * np.float32(-np.pi / 2 * CS_A * lam**3)
    chi += np.float32(np.pi * lam * defocus_A)
    chi *= k2
    chi += np.float32(math.asin(p.amplitude_contrast))  # sqrt(1-A^2) sin x + A cos x = sin(x + asin A)
    out = np.sin(chi, out=chi)
    k2 *= np.float32(-p.b_factor_A2 / 4)
    out *= np.exp(k2, out=k2)
    return np.negative(out, out=out)


def _energy(spectrum: np.ndarray, nx: int) -> float:
    """Sum of squares of ``irfft2(spectrum)`` (Parseval on the half spectrum)."""
    total = 2 * np.vdot(spectrum, spectrum).real - np.vdot(spectrum[:, 0], spectrum[:, 0]).real
    if nx % 2 == 0:
        total -= np.vdot(spectrum[:, -1], spectrum[:, -1]).real
    return float(total) / (spectrum.shape[0] * nx)


def _contrast(p: SynthParams, particles: np.ndarray, n: int, features: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Relative phase contrast [ny, nx] float32 and the noise scale giving ``p.snr``."""
    transfer = ctf(p)
    spectrum = scipy.fft.rfft2(particles, workers=-1)
    spectrum *= transfer
    counts = p.counts_per_px
    rms = min(math.sqrt(p.snr / counts), MAX_RMS_CONTRAST)
    energy = _energy(spectrum, p.shape[1])
    # Particle signal energy per pixel of disk area -> rms**2; without particles unit density -> rms.
    scale = rms / math.sqrt(energy / (n * np.pi * p.radius_px**2)) if n and energy > 0 else rms
    if features is not None:
        extra = scipy.fft.rfft2(features, workers=-1)
        extra *= transfer
        spectrum += extra
    spectrum *= np.float32(scale)
    contrast = scipy.fft.irfft2(spectrum, s=p.shape, workers=-1, overwrite_x=True)
    return contrast, rms * math.sqrt(counts / p.snr)


# --------------------------------------------------------------------------- exposure


def _background(p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """[ny, nx] float32 expected counts through the ice: ``counts * (1 - thickness change)``.

    The thickness change is a ramp spanning ``ice_gradient`` in a random direction
    plus three separable cosines of <= 1.5 cycles across the image (rank-5 product).
    """
    ny, nx = p.shape
    y, x = np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2
    theta = rng.uniform(0, 2 * np.pi)
    span = (nx - 1) * abs(math.cos(theta)) + (ny - 1) * abs(math.sin(theta))
    g, counts = p.ice_gradient, p.counts_per_px
    cols = [counts * (1 - g * math.sin(theta) * y / span), np.ones(ny)]  # F [ny, K]
    rows = [np.ones(nx), -counts * g * math.cos(theta) * x / span]  # G [K, nx]
    for amp, fy, fx, py, px in rng.uniform((0, 0, 0, 0, 0), (0.15, 1.5, 1.5, 2 * np.pi, 2 * np.pi), (3, 5)):
        cols.append(-counts * g * amp * np.cos(2 * np.pi * fy * y / ny + py))
        rows.append(np.cos(2 * np.pi * fx * x / nx + px))
    return np.stack(cols, axis=1).astype(np.float32) @ np.stack(rows).astype(np.float32)


def _gaussian_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """[ny, nx] float32 standard normal."""
    out = np.empty(shape, dtype=np.float32)
    _by_row_blocks(rng, out, lambda gen, block: gen.standard_normal(out=block, dtype=np.float32))
    return out


def _expose(expected: np.ndarray, rng: np.random.Generator, noise_scale: float) -> np.ndarray:
    """Shot noise in place: ``expected + noise_scale * sqrt(expected) * N(0, 1)``; expected >= 0 first."""

    def expose(gen: np.random.Generator, block: np.ndarray) -> None:
        noise = gen.standard_normal(block.shape, dtype=np.float32)
        np.maximum(block, 0, out=block)
        noise *= np.sqrt(block)
        if noise_scale != 1:
            noise *= np.float32(noise_scale)
        block += noise

    _by_row_blocks(rng, expected, expose)
    return expected


def _by_row_blocks(
    rng: np.random.Generator, image: np.ndarray, task: Callable[[np.random.Generator, np.ndarray], object]
) -> None:
    """Run ``task(generator, rows)`` over fixed row blocks of ``image`` on threads.

    Each block has its own generator spawned from ``rng``; the block count is fixed,
    so the result does not depend on the number of CPUs.
    """
    bounds = np.linspace(0, image.shape[0], NOISE_BLOCKS + 1).astype(int).tolist()
    gens = rng.spawn(NOISE_BLOCKS)
    with ThreadPoolExecutor(max_workers=min(NOISE_BLOCKS, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda i: task(gens[i], image[bounds[i] : bounds[i + 1]]), range(NOISE_BLOCKS)))


# --------------------------------------------------------------------------- public


def _check_centres(p: SynthParams, centres_xy: np.ndarray) -> np.ndarray:
    xy = np.array(centres_xy, dtype=np.float64)  # a copy: later edits of the input do not leak in
    xy = xy.reshape(0, 2) if xy.size == 0 else xy
    _require(xy.ndim == 2 and xy.shape[1] == 2, "centres_xy", f"must have shape [N, 2], got {xy.shape}")
    ny, nx = p.shape
    inside = np.isfinite(xy).all(axis=1) & (xy >= 0).all(axis=1) & (xy[:, 0] <= nx - 1) & (xy[:, 1] <= ny - 1)
    _require(bool(inside.all()), "centres_xy", f"has {int((~inside).sum())} centres outside the {nx}x{ny} image")
    return xy


def make_micrograph(params: SynthParams, seed: int, centres_xy: np.ndarray | None = None) -> SynthMicrograph:
    """A synthetic micrograph, fully determined by ``params``, ``seed`` and ``centres_xy``.

    ``centres_xy`` [N, 2] (x = column, y = row) puts particles exactly there (overlaps
    are not checked; carbon and contaminants are then placed clear of them, or left
    out with a logged warning); without it, centres are random and non-overlapping.

    Raises:
        ValueError: ``centres_xy`` has the wrong shape or lies outside the image, or
            ``params.n_particles`` particles do not fit.
    """
    rng = np.random.default_rng(seed)
    fixed = None if centres_xy is None else _check_centres(params, centres_xy)
    features = _draw_features(params, rng, np.zeros((0, 2)) if fixed is None else fixed)
    xy = _place_particles(params, rng, features) if fixed is None else fixed
    density = _render_particles(params, rng, xy)
    maps = _feature_maps(params, rng, features)
    contrast, noise_scale = _contrast(params, density, len(xy), None if maps is None else maps[0])
    expected = _background(params, rng)
    if maps is not None:
        expected *= np.subtract(1, maps[1], out=maps[1])  # transmission
    dark = _dark_objects(params, features, contrast, xy)
    if dark is not None:
        expected *= np.subtract(1, dark, out=dark)
    contrast += 1
    expected *= contrast
    image = _expose(expected, rng, noise_scale)
    log.debug("synthetic micrograph %s: %d particles, seed %d", params.shape, len(xy), seed)
    return SynthMicrograph(image=image.astype(params.dtype, copy=False), centres_xy=xy, params=params, junk=_junk_mask(params, features))


def write_micrograph_with_truth(folder: str | Path, name: str, synth: SynthMicrograph) -> tuple[Path, Path]:
    """Write ``<name>_truth.star`` (rlnCoordinateX/Y), ``<name>_junk.npy`` (the junk mask, when there is junk), then ``<name>.mrc``.

    The truth is written first, so a watcher that sees the micrograph finds its truth.

    Raises:
        OutputError: a file could not be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror}") from exc
    mrc, star = folder / f"{name}.mrc", folder / f"{name}_truth.star"
    truth = pd.DataFrame({"rlnCoordinateX": synth.centres_xy[:, 0], "rlnCoordinateY": synth.centres_xy[:, 1]})
    write_star(star, truth)
    if synth.junk is not None:
        try:
            np.save(folder / f"{name}_junk.npy", synth.junk)
        except OSError as exc:
            raise OutputError(f"cannot write {folder / f'{name}_junk.npy'}: {exc.strerror}") from exc
    write_micrograph(mrc, synth.image, synth.params.pixel_size_A)
    return mrc, star


def write_session(folder: str | Path, n: int, params: SynthParams, seed: int = 0, prefix: str = "mic") -> list[Path]:
    """Write ``n`` micrographs ``{prefix}_{i:05d}.mrc`` with truth STARs; return the MRC paths.

    Micrograph ``i`` uses the seed drawn from ``SeedSequence([seed, i])``.

    Raises:
        ValueError: ``n`` is negative, or as :func:`make_micrograph`.
        OutputError: a file could not be written.
    """
    _require(n >= 0, "n", f"must be >= 0, got {n}")
    paths = []
    for i in range(n):
        mic_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        synth = make_micrograph(params, mic_seed)
        paths.append(write_micrograph_with_truth(folder, f"{prefix}_{i:05d}", synth)[0])
    log.info("wrote %d synthetic micrographs to %s", n, folder)
    return paths
