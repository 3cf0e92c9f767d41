"""Particle localisation by a session-learned template: centres that hold in crowded micrographs.

The particle is whatever round object of the given diameter repeats across the
session. Its rotationally averaged profile is learned without labels: start from
the peaks of a scale-normalised Laplacian of Gaussian (a dark disk of the particle's
diameter), average the neighbourhood of the strongest peaks over the session's
micrographs into a radial profile, match that template on every micrograph, and
repeat with the new peaks. Matching the profile (a shell with a light core, a disk
with a halo) finds particles that touch each other, where a binary map's connected
components merge them.

All images here are on the working grid, ``[row, col]``; centres are ``xy [N, 2]``
(x = column, y = row) in grid pixels. Written once for NumPy and CuPy; peak lists
come back to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from emmae.backend import backend_of, cpu_threads, to_host
from emmae.runtime.kernels.filters import Array
from emmae.runtime.picking.postprocess import Candidates

log = logging.getLogger(__name__)
TEMPLATE_RADIUS_DIAMETERS = 0.75  # the template covers the particle and its immediate surround


def strongest(found: Candidates, fraction: float) -> np.ndarray:
    """Centres of the top ``fraction`` of the candidates by score (at least 3, or all there are)."""
    count = min(len(found), max(3, int(np.ceil(fraction * len(found)))))
    return found.xy[np.argsort(-found.score, kind="stable")[:count]]


def matching_image(binned: Array, diameter_grid_px: float, sigma_diameters: float, contrast: str, clip_sigma: float = 0.0) -> Array:
    """The binned micrograph smoothed and standardised, particles made dark (``contrast="bright"`` inverts).

    ``clip_sigma > 0`` clips the standardised image to that many standard deviations
    (after a robust centring on the median), so that carbon and contamination, far darker
    than any particle, weigh no more than a particle in the template and its matches.
    """
    backend = backend_of(binned)
    xp = backend.xp
    image = binned.astype(np.float32)
    sigma = sigma_diameters * diameter_grid_px
    if sigma > 0:
        image = backend.ndimage.gaussian_filter(image, sigma, mode="reflect")
    if clip_sigma > 0:
        centre = xp.median(image)
        spread = 1.4826 * float(xp.median(xp.abs(image - centre)))  # the MAD: contamination does not inflate it
        image = xp.clip((image - centre) / max(spread, 1e-12), -clip_sigma, clip_sigma)
    image = (image - image.mean()) / max(float(image.std()), 1e-12)
    return -image if contrast == "bright" else image


def blob_response(image: Array, diameter_grid_px: float) -> Array:
    """Scale-normalised LoG at the particle's scale: positive on dark disks of that diameter.

    ``sigma**2 * gaussian_laplace(image, sigma)`` with ``sigma = d / (2 sqrt 2)``,
    computed by FFT (borders reflected over 3 sigma): one transform pair whatever the
    particle's size.
    """
    backend = backend_of(image)
    xp, fft = backend.xp, backend.fft
    sigma = diameter_grid_px / 2 / np.sqrt(2)
    pad = int(min(np.ceil(3 * sigma), min(image.shape) - 1))
    padded = xp.pad(image.astype(np.float32), pad, mode="symmetric")
    ky = xp.asarray(2 * np.pi * np.fft.fftfreq(padded.shape[0]), dtype=np.float32)
    kx = xp.asarray(2 * np.pi * np.fft.rfftfreq(padded.shape[1]), dtype=np.float32)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    transfer = -k2 * xp.exp(-k2 * np.float32(sigma**2 / 2)) * np.float32(sigma**2)
    out = fft.irfft2(fft.rfft2(padded) * transfer, s=padded.shape)
    return out[pad : pad + image.shape[0], pad : pad + image.shape[1]].astype(np.float32)


def find_peaks(response: Array, min_distance_px: float) -> Candidates:
    """Positive local maxima of ``response`` over a ``min_distance_px`` square window, scored by the response."""
    backend = backend_of(response)
    size = max(3, int(min_distance_px))
    local_max = (response == backend.ndimage.maximum_filter(response, size=size, mode="nearest")) & (response > 0)
    rows, cols = (to_host(a) for a in backend.xp.nonzero(local_max))
    value = to_host(response[backend.xp.asarray(rows), backend.xp.asarray(cols)]) if len(rows) else np.zeros(0)
    return Candidates(np.stack([cols, rows], axis=1).astype(np.float64), np.asarray(value, dtype=np.float64))


def radial_profile(image: Array, centres_xy: np.ndarray, radius_px: int) -> tuple[np.ndarray, int]:
    """Mean radial profile ``[radius_px + 1]`` of ``image`` around the centres that fit inside it, and their count."""
    host = to_host(image)
    h, w = host.shape
    xy = np.round(centres_xy).astype(int)
    inside = (xy[:, 0] >= radius_px) & (xy[:, 1] >= radius_px) & (xy[:, 0] < w - radius_px) & (xy[:, 1] < h - radius_px)
    xy = xy[inside]
    if len(xy) == 0:
        return np.zeros(radius_px + 1), 0
    offsets = np.arange(-radius_px, radius_px + 1)
    patches = host[xy[:, 1, None, None] + offsets[None, :, None], xy[:, 0, None, None] + offsets[None, None, :]]  # [N, 2r+1, 2r+1]
    mean = patches.mean(axis=0)
    ring = np.round(np.hypot(*np.meshgrid(offsets, offsets, indexing="ij"))).astype(int)
    within = ring <= radius_px
    profile = np.bincount(ring[within], mean[within], minlength=radius_px + 1) / np.maximum(np.bincount(ring[within], minlength=radius_px + 1), 1)
    return profile, len(xy)


def template_from_profile(profile: np.ndarray) -> np.ndarray:
    """A zero-mean, unit-norm 2-D disk template ``[2r+1, 2r+1]`` from a radial profile ``[r+1]``."""
    radius = len(profile) - 1
    offsets = np.arange(-radius, radius + 1)
    ring = np.hypot(*np.meshgrid(offsets, offsets, indexing="ij"))
    within = ring <= radius
    template = np.interp(ring, np.arange(radius + 1), profile) * within
    template[within] -= template[within].mean()
    norm = np.sqrt(np.sum(template**2))
    return (template / norm if norm > 0 else template).astype(np.float32)


def match(image: Array, template: np.ndarray) -> Array:
    """Cross-correlation of ``image`` with a centred ``template`` (FFT, reflected borders), same shape as ``image``."""
    backend = backend_of(image)
    xp, fft = backend.xp, backend.fft
    radius = template.shape[0] // 2
    padded = xp.pad(image, radius, mode="reflect")
    kernel = xp.zeros_like(padded)
    kernel[: template.shape[0], : template.shape[1]] = xp.asarray(template)
    kernel = xp.roll(kernel, (-radius, -radius), axis=(0, 1))
    product = fft.rfft2(padded) * xp.conj(fft.rfft2(kernel))
    out = fft.irfft2(product, s=padded.shape)
    return out[radius:-radius, radius:-radius].astype(np.float32)


def learn_profile(images: list[Array], diameter_grid_px: float, iterations: int, top_fraction: float,
                  tolerance: float = 1e-3, avoid: list[np.ndarray] | None = None, responses: list[Array] | None = None) -> np.ndarray:
    """The session's radial particle profile, learned from ``images`` (outputs of :func:`matching_image`).

    Round 0 takes the strongest blob-filter peaks; each further round matches the
    current template and re-averages around its strongest peaks, until the profile
    changes by less than ``tolerance`` (relative L2) or ``iterations`` rounds are done.
    A profile equal to an earlier round's starts a cycle: the last round's profile is
    then returned at once, the same as running every round gives.
    ``avoid``: per image, centres ``[M, 2]`` (grid x, y) of what is not a particle
    (atypical peaks); no peak within one diameter of them enters the profile.
    ``responses``: per image, its :func:`blob_response` at ``diameter_grid_px`` when
    the caller has it already (computed here otherwise).
    """
    radius = max(2, int(round(TEMPLATE_RADIUS_DIAMETERS * diameter_grid_px)))
    avoid = avoid if avoid is not None else [np.zeros((0, 2))] * len(images)
    on_host = len(images) > 1 and all(backend_of(image).xp is np for image in images)
    with ThreadPoolExecutor(min(len(images), cpu_threads())) if on_host else nullcontext() as pool:
        each = pool.map if pool is not None else map  # NumPy images in threads (the FFTs and filters release the GIL), in order
        return _rounds(images, responses, avoid, diameter_grid_px, radius, iterations, top_fraction, tolerance, each)


def _rounds(images: list[Array], responses: list[Array] | None, avoid: list[np.ndarray], diameter_grid_px: float, radius: int,
            iterations: int, top_fraction: float, tolerance: float, each: Callable) -> np.ndarray:
    """:func:`learn_profile`'s rounds; ``each(function, items)`` maps over the images (in order)."""

    def peaks_profile(image: Array, response: Array, away: np.ndarray) -> tuple[np.ndarray, int]:
        found = far_from(find_peaks(response, diameter_grid_px / 2), away, diameter_grid_px)
        return radial_profile(image, strongest(found, top_fraction), radius)

    if responses is None:
        responses = list(each(lambda image: blob_response(image, diameter_grid_px), images))
    profile = np.zeros(radius + 1)
    history: list[np.ndarray] = []  # each round's profile
    for round_ in range(iterations + 1):
        total, count = np.zeros(radius + 1), 0
        for part, n in each(peaks_profile, images, responses, avoid):  # summed in image order: the same profile as one thread gives
            total, count = total + part * n, count + n
        if count == 0:
            break
        previous, profile = profile, total / count
        history.append(profile)
        change = relative_change(profile, previous)
        log.debug("template round %d: profile change %.2g", round_, change)
        if round_ == iterations or change < tolerance:
            break
        j = next((j for j in range(round_ - 1) if np.array_equal(profile, history[j])), None)
        if j is not None:
            # The same peaks as in round j, so the same profile: the rounds left would only
            # cycle through the profiles since, and the last round's is known now.
            log.debug("template round %d: repeats round %d", round_, j)
            return history[j + (iterations - j) % (round_ - j)]
        template = template_from_profile(profile)
        responses = list(each(lambda image: match(image, template), images))
    return profile


def relative_change(profile: np.ndarray, before: np.ndarray) -> float:
    """``|profile - before| / |profile|`` (L2)."""
    return float(np.linalg.norm(profile - before) / max(np.linalg.norm(profile), 1e-12))


def far_from(found: Candidates, centres_xy: np.ndarray, distance_px: float) -> Candidates:
    """The candidates farther than ``distance_px`` from every one of ``centres_xy [M, 2]``."""
    if len(found) == 0 or len(centres_xy) == 0:
        return found
    nearest, _ = cKDTree(np.asarray(centres_xy, np.float64)).query(found.xy)
    return found.take(np.flatnonzero(nearest > distance_px))


def match_peaks(image: Array, profile: np.ndarray, profile_diameter_grid_px: float, diameter_grid_px: float, min_distance_px: float,
                weight: Array | None = None) -> Candidates:
    """Peaks of the template of ``profile`` matched on ``image`` (a :func:`matching_image`), scored by the match value.

    A profile learned at another particle size in grid pixels is rescaled first;
    ``weight`` (``[H, W]``), when given, multiplies the match before the peaks are found.
    """
    if abs(diameter_grid_px - profile_diameter_grid_px) > 0.05 * profile_diameter_grid_px:
        radius = max(2, int(round(len(profile) * diameter_grid_px / profile_diameter_grid_px)))
        profile = np.interp(np.linspace(0, len(profile) - 1, radius), np.arange(len(profile)), profile)
    response = match(image, template_from_profile(profile))
    if weight is not None:
        response = response * weight
    return find_peaks(response, min_distance_px)


@dataclass(frozen=True)
class Calibration:
    """How a session turns match values into a 0-1 figure of merit: ``1 / (1 + exp(-(value - cut) * scale))``.

    ``cut`` (figure of merit 0.5) is Otsu's split between background and particle peaks
    over the session's sample; the median particle peak scores 0.9, as far below the
    cut scores 0.1. Fixed per session, so an empty micrograph's peaks score low.
    """

    cut: float
    scale: float

    def figure_of_merit(self, values: np.ndarray) -> np.ndarray:
        z = (np.asarray(values, np.float64) - self.cut) * self.scale
        return 1 / (1 + np.exp(-np.clip(z, -60, 60)))


def calibrate(values: np.ndarray) -> Calibration | None:
    """The session's :class:`Calibration` from its sample's match values; None with fewer than 4 peaks or one class empty."""
    values = np.asarray(values, np.float64)
    if len(values) < 4:
        return None
    cut = otsu_threshold(values)
    high = values[values > cut]
    if len(high) < 2 or float(np.median(high)) <= cut:
        return None
    return Calibration(cut=float(cut), scale=float(np.log(9) / (np.median(high) - cut)))


def confidence(values: np.ndarray) -> np.ndarray:
    """A 0-1 confidence per peak value: the posterior of the upper of two Gaussian classes split at Otsu's threshold.

    0.5 falls between the classes; fewer than 4 peaks or one class empty gives 0.5 for all.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 4:
        return np.full(len(values), 0.5)
    cut = otsu_threshold(values)
    low, high = values[values <= cut], values[values > cut]
    if len(low) < 2 or len(high) < 2:
        return np.full(len(values), 0.5)
    prior_high = len(high) / len(values)
    log_high = _log_normal(values, high.mean(), high.std() + 1e-12) + np.log(prior_high)
    log_low = _log_normal(values, low.mean(), low.std() + 1e-12) + np.log(1 - prior_high)
    posterior = 1 / (1 + np.exp(np.clip(log_low - log_high, -60, 60)))
    posterior[values >= high.mean()] = np.maximum(posterior[values >= high.mean()], 0.5)  # the upper tail stays confident
    posterior[values <= low.mean()] = np.minimum(posterior[values <= low.mean()], 0.5)
    return posterior


def _log_normal(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, grand = weight[-1], mean[-1]
    between = (grand * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[np.argmax(between)])
