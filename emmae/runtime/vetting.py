"""Latent vetting: the session's particles are a common, consistent population in latent space; junk is not.

Each candidate is described by the encoder's latent vector at its centre (the latent
map smoothed over ``DESCRIPTOR_WINDOW`` x ``DESCRIPTOR_WINDOW`` patches). Over a
session the candidates that look like particles form one compact population; carbon,
ice crystals, contamination and empty ice lie far from it, whatever their contrast.
The population is fitted without labels: the mean and the leading ``components``
principal axes of the candidates' descriptors, refitted after trimming the most
distant ``1 - keep`` of them (so that junk among the candidates does not widen it).
A candidate's distance is its squared Mahalanobis distance in those axes; one beyond
``postprocess.latent_limit`` is vetoed.

The same test keeps atypical peaks (the darkest blobs of a session, which are rarely
particles) out of the template the session learns (:func:`emmae.runtime.session.fit_session`).

Descriptors are computed with the latents' array module (NumPy or CuPy); the
population itself is small and lives on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emmae.backend import backend_of, to_host
from emmae.runtime.cluster import smooth_latents
from emmae.runtime.filters import Array

DESCRIPTOR_WINDOW = 2  # latent patches averaged per side around a candidate
COMPONENTS = 8  # principal axes of the population
KEEP = 0.9  # share of the candidates kept at each trimming round
ROUNDS = 3  # fits: the first on every candidate, then on the closest KEEP of the previous fit


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
    """Latent descriptors ``[N, D]`` (host, float32) of candidates at grid positions ``xy_grid [N, 2]`` on a latent map ``[h, w, D]``."""
    xp = backend_of(latents).xp
    smoothed = smooth_latents(latents, DESCRIPTOR_WINDOW)
    h, w = smoothed.shape[:2]
    xy = np.asarray(xy_grid, np.float64).reshape(-1, 2)
    cols = np.clip((xy[:, 0] // patch_px).astype(np.int64), 0, w - 1)
    rows = np.clip((xy[:, 1] // patch_px).astype(np.int64), 0, h - 1)
    return np.asarray(to_host(smoothed[xp.asarray(rows), xp.asarray(cols)]), np.float32)


def fit_population(points: np.ndarray, components: int = COMPONENTS, keep: float = KEEP, rounds: int = ROUNDS) -> Population | None:
    """The compact population of ``points [N, D]``, robust to a minority of outliers; None with too few points."""
    points = np.asarray(points, np.float64)
    components = min(components, points.shape[1] if points.ndim == 2 else 0)
    if points.ndim != 2 or len(points) < 4 * max(components, 1) or components < 1:
        return None
    chosen = points
    population = None
    for _ in range(rounds):
        mean = chosen.mean(axis=0)
        _, singular, vt = np.linalg.svd(chosen - mean, full_matrices=False)
        variances = np.maximum(singular[:components] ** 2 / len(chosen), 1e-12)
        population = Population(mean, vt[:components], variances, len(points))
        distance = population.distance2(chosen)
        chosen = chosen[distance <= np.quantile(distance, keep)]
        if len(chosen) < 4 * components:
            break
    return population
