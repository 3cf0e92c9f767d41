"""Assembly of one synthetic micrograph from its seed: :func:`make_micrograph`.

Owns the order in which the random stream is consumed (junk, particle centres,
particle density, junk maps, background, noise), which fixes every image for a given
seed, and the checking of caller-given centres.
"""

from __future__ import annotations

import logging

import numpy as np

from emmae.synth.imaging import expose, ice_background, phase_contrast
from emmae.synth.junk import dark_objects, draw_features, feature_maps, junk_mask
from emmae.synth.layout import place_particles
from emmae.synth.params import SynthMicrograph, SynthParams, require
from emmae.synth.particles import render_particles

# __package__, not __name__: records keep the logger name "emmae.synth" they had before the split.
log = logging.getLogger(__package__)


def _check_centres(p: SynthParams, centres_xy: np.ndarray) -> np.ndarray:
    xy = np.array(centres_xy, dtype=np.float64)  # a copy: later edits of the input do not leak in
    xy = xy.reshape(0, 2) if xy.size == 0 else xy
    require(xy.ndim == 2 and xy.shape[1] == 2, "centres_xy", f"must have shape [N, 2], got {xy.shape}")
    ny, nx = p.shape
    inside = np.isfinite(xy).all(axis=1) & (xy >= 0).all(axis=1) & (xy[:, 0] <= nx - 1) & (xy[:, 1] <= ny - 1)
    require(bool(inside.all()), "centres_xy", f"has {int((~inside).sum())} centres outside the {nx}x{ny} image")
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
    features = draw_features(params, rng, np.zeros((0, 2)) if fixed is None else fixed)
    xy = place_particles(params, rng, features) if fixed is None else fixed
    density = render_particles(params, rng, xy)
    maps = feature_maps(params, rng, features)
    contrast, noise_scale = phase_contrast(params, density, len(xy), None if maps is None else maps[0])
    expected = ice_background(params, rng)
    if maps is not None:
        expected *= np.subtract(1, maps[1], out=maps[1])  # transmission
    dark = dark_objects(params, features, contrast, xy)
    if dark is not None:
        expected *= np.subtract(1, dark, out=dark)
    contrast += 1
    expected *= contrast
    image = expose(expected, rng, noise_scale)
    log.debug("synthetic micrograph %s: %d particles, seed %d", params.shape, len(xy), seed)
    return SynthMicrograph(image=image.astype(params.dtype, copy=False), centres_xy=xy, params=params, junk=junk_mask(params, features))
