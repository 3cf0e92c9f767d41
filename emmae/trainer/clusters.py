"""Train-set clustering (Algorithm 1): k-means on training latents and the particle cluster.

Two ways to name the particle cluster among the ``k`` train-set clusters:

* :func:`particle_cluster_by_reference`: from one micrograph with particle
  coordinates: the cluster most enriched inside the particle disks (the share of its
  latents inside the disks over the disks' share of the micrograph). The
  reference code takes the cluster with the most latents inside; enrichment does not
  favour large clusters.
* :func:`particle_cluster_by_prior`: no annotation, only the particle diameter: the
  cluster whose connected regions are most often particle-sized (the share of its
  latents that lie in components whose area is within a factor ~2 of the particle
  disk's; background forms large regions, noise small specks), on latents smoothed
  as the per-micrograph clustering smooths them (:func:`smoothed_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from emmae.runtime.picking.cluster import smooth_latents, smoothing_window
from emmae.runtime.kernels.kmeans import KMeansResult, assign, kmeans


@dataclass(frozen=True)
class ClusterChoice:
    """The chosen cluster and every cluster's score (higher is more particle-like)."""

    cluster: int
    scores: list[float]
    method: str


def fit_train_clusters(latent_maps: list[np.ndarray], k: int = 4, seed: int = 0, max_points: int | None = None) -> KMeansResult:
    """k-means on every latent vector of the training maps ``[h, w, D]`` (unsmoothed).

    ``max_points`` subsamples (seeded) before fitting, for large training sets.
    """
    points = np.concatenate([m.reshape(-1, m.shape[-1]) for m in latent_maps]).astype(np.float32)
    if max_points is not None and len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    return kmeans(points, k, seed=seed)


def label_map(latent_map: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid label of every latent ``[h, w]``."""
    h, w, d = latent_map.shape
    return np.asarray(assign(latent_map.reshape(-1, d).astype(np.float32), centroids)).reshape(h, w)


def smoothed_labels(latent_maps: list[np.ndarray], centroids: np.ndarray, latent_diameters: list[float], patch_px: int) -> list[np.ndarray]:
    """Nearest-centroid labels of each map after the per-micrograph latent smoothing."""
    return [
        label_map(np.asarray(smooth_latents(m, smoothing_window(d * patch_px, patch_px))), centroids)
        for m, d in zip(latent_maps, latent_diameters, strict=True)
    ]


def disk_mask(shape: tuple[int, int], centres_xy: np.ndarray, diameter: float) -> np.ndarray:
    """Boolean ``shape`` map of the disks of ``diameter`` around ``centres_xy`` (x = column, y = row)."""
    yy, xx = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    r2 = (diameter / 2) ** 2
    for x, y in np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2):
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= r2
    return mask


def particle_cluster_by_reference(labels: np.ndarray, particle_mask: np.ndarray, k: int) -> ClusterChoice:
    """The cluster most enriched inside the particle disks of one annotated micrograph."""
    inside = particle_mask.mean()
    scores = []
    for c in range(k):
        members = labels == c
        share = particle_mask[members].mean() if members.any() else 0.0
        scores.append(float(share / inside) if inside > 0 else 0.0)
    return ClusterChoice(cluster=int(np.argmax(scores)), scores=scores, method="reference")


def particle_cluster_by_prior(label_maps: list[np.ndarray], diameters: list[float], k: int, tolerance: float = 2.0) -> ClusterChoice:
    """The cluster whose 4-connected regions most often have the area of a particle disk.

    ``diameters`` are in pixels of the label maps; a region counts when its area is
    within ``tolerance`` times (either way) the disk's.
    """
    kept = np.zeros(k)
    total = np.zeros(k)
    for labels, diameter in zip(label_maps, diameters, strict=True):
        disk = np.pi * (diameter / 2) ** 2
        for c in range(k):
            regions, count = ndi.label(labels == c)
            if count == 0:
                continue
            areas = np.bincount(regions.ravel())[1:]
            fits = (areas >= disk / tolerance) & (areas <= disk * tolerance)
            kept[c] += areas[fits].sum()
            total[c] += areas.sum()
    scores = [float(kept[c] / total[c]) if total[c] else 0.0 for c in range(k)]
    return ClusterChoice(cluster=int(np.argmax(scores)), scores=scores, method="prior")
