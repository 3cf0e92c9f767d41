"""Latent vetting: the session's particles are a common, consistent population in latent space; junk is not.

Each candidate is described by the encoder's latent vector at its centre (the latent
map smoothed over ``DESCRIPTOR_WINDOW`` x ``DESCRIPTOR_WINDOW`` patches). Over a
session the candidates that look like particles form one compact population; carbon,
ice crystals, contamination and empty ice lie far from it, whatever their contrast.
The population is fitted without labels: the mean and the leading ``components``
principal axes of the candidates' descriptors, refitted on the closest ``keep`` of
them (so that junk among the candidates does not widen it), with the variances
corrected for the trimming.
A candidate's distance is its squared Mahalanobis distance in those axes; one beyond
``postprocess.latent_limit`` is vetoed.

The same test keeps atypical peaks (the darkest blobs of a session, which are rarely
particles) out of the template the session learns (:func:`emmae.runtime.picking.session.fit_session`).

Descriptors are computed with the latents' array module (NumPy or CuPy); the
population itself is small and lives on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from emmae.backend import backend_of, to_host
from emmae.runtime.kernels.filters import Array, box_kernel

DESCRIPTOR_WINDOW = 2  # latent patches averaged per side around a candidate
COMPONENTS = 8  # principal axes of the population
KEEP = 0.9  # share of the candidates each refit keeps (the closest to the previous fit)
ROUNDS = 3  # fits: the first on every candidate, then on the closest KEEP of them


@dataclass(frozen=True)
class Population:
    """The typical candidates' latents: ``mean [D]``, principal ``axes [m, D]`` and their ``variances [m]``."""

    mean: np.ndarray
    axes: np.ndarray
    variances: np.ndarray
    candidates: int  # how many candidates it was fitted on

    def distance2(self, descriptors: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance ``[N]`` of ``descriptors [N, D]`` in the population's axes."""
        projected = (np.asarray(descriptors, np.float64) - self.mean) @ self.axes.T  # [N, m]
        return np.sum(projected**2 / self.variances, axis=1)

    def whitened(self, descriptors: np.ndarray) -> np.ndarray:
        """``descriptors [N, D]`` in the population's principal axes, each scaled to unit variance: ``[N, m]``."""
        return ((np.asarray(descriptors, np.float64) - self.mean) @ self.axes.T) / np.sqrt(self.variances)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "axes": self.axes.tolist(), "variances": self.variances.tolist(), "candidates": self.candidates}

    @classmethod
    def from_dict(cls, data: dict) -> Population:
        """Raises: KeyError, ValueError: not a population's dictionary."""
        axes = np.asarray(data["axes"], np.float64)
        population = cls(np.asarray(data["mean"], np.float64), axes, np.asarray(data["variances"], np.float64), int(data["candidates"]))
        if axes.ndim != 2 or population.mean.shape != axes.shape[1:] or population.variances.shape != axes.shape[:1]:
            raise ValueError("inconsistent population shapes")
        return population


def descriptors(latents: Array, xy_grid: np.ndarray, patch_px: int) -> np.ndarray:
    """Latent descriptors ``[N, D]`` (host, float32) of candidates at grid positions ``xy_grid [N, 2]`` on a latent map ``[h, w, D]``.

    The latent map smoothed as :func:`emmae.runtime.picking.cluster.smooth_latents` does
    (``DESCRIPTOR_WINDOW``, mirrored borders), evaluated only under the candidates,
    less the micrograph's mean latent.
    """
    xp = backend_of(latents).xp
    h, w = latents.shape[:2]
    xy = np.asarray(xy_grid, np.float64).reshape(-1, 2)
    cols = np.clip((xy[:, 0] // patch_px).astype(np.int64), 0, w - 1)
    rows = np.clip((xy[:, 1] // patch_px).astype(np.int64), 0, h - 1)
    kernel = box_kernel(float(DESCRIPTOR_WINDOW)).astype(np.float32)
    reach = len(kernel) // 2
    smoothed = xp.zeros((len(xy), latents.shape[-1]), np.float32)
    for dy, ky in zip(range(-reach, reach + 1), kernel):
        for dx, kx in zip(range(-reach, reach + 1), kernel):
            at = latents[xp.asarray(_mirror(rows + dy, h)), xp.asarray(_mirror(cols + dx, w))]
            smoothed += np.float32(ky * kx) * at.astype(np.float32)
    centre = latents.reshape(-1, latents.shape[-1]).mean(axis=0)  # the micrograph's own level (ice, defocus) is not junk
    return np.asarray(to_host(smoothed - centre), np.float32)


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Indices reflected into ``[0, size)`` about the edge samples (REFLECT_101, ndimage's "mirror")."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def fit_population(points: np.ndarray, components: int = COMPONENTS, keep: float = KEEP, rounds: int = ROUNDS) -> Population | None:
    """The compact population of ``points [N, D]``, robust to outliers up to ``1 - keep`` of them; None with too few points.

    A minimum-covariance-determinant style fit: each round refits on the ``keep``
    share of *all* points closest to the previous fit, and rescales the variances
    by the consistency factor of that trimming (for a Gaussian population, the
    variances of its inner ``keep`` share are too small by a known factor), so that
    distances of the population's own members follow a chi-square law whatever
    ``keep`` is.
    """
    points = np.asarray(points, np.float64)
    components = min(components, points.shape[1] if points.ndim == 2 else 0)
    if points.ndim != 2 or len(points) < 4 * max(components, 1) or components < 1:
        return None
    chosen, factor = points, 1.0
    population = None
    for _ in range(rounds):
        mean = chosen.mean(axis=0)
        _, singular, vt = np.linalg.svd(chosen - mean, full_matrices=False)
        variances = np.maximum(singular[:components] ** 2 / len(chosen), 1e-12) * factor
        population = Population(mean, vt[:components], variances, len(points))
        count = int(np.ceil(keep * len(points)))
        if count >= len(points) or count < 4 * components:
            break
        chosen = points[np.argsort(population.distance2(points), kind="stable")[:count]]
        factor = consistency_factor(keep, components)
    return population


def consistency_factor(keep: float, components: int) -> float:
    """How much the variances of the inner ``keep`` share of a ``components``-dimensional Gaussian understate the whole's."""
    cut = chi2.ppf(keep, components)
    return float(keep / chi2.cdf(cut, components + 2))
