"""Particle layout: random non-overlapping centres clear of the border and of the junk.

Owns the default packing (a share of the junk-free area), the check that the asked
number of particles fits (against the jamming coverage of random sequential
adsorption), and the vectorised random sequential adsorption itself.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import KDTree

from emmae.synth.junk import Features
from emmae.synth.params import SynthParams, require

PACKING = 0.35  #: default fraction of the free area covered by particle disks
MIN_SEPARATION = 1.05  #: minimum centre distance, in diameters
RSA_JAMMING = 0.547  #: jamming coverage of random sequential adsorption of disks


def place_particles(p: SynthParams, rng: np.random.Generator, features: Features) -> np.ndarray:
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
    require(n <= n_jam, "n_particles", f"={n} do not fit {sep:.1f} px apart (at most ~{n_jam})")
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
