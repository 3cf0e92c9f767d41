"""k-means for NumPy and CuPy arrays: greedy k-means++ seeding and Lloyd iterations.

One code path for both backends (the CuPy idiom); the random choices of the seeding
are made on the host from an explicit seed, so a fit is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emmae.backend import backend_of, cuml_kmeans, to_host
from emmae.errors import BackendError
from emmae.runtime.kernels.filters import Array


@dataclass(frozen=True)
class KMeansResult:
    """``centroids`` ``[k, D]`` and ``labels`` ``[N]`` on the input's backend."""

    centroids: Array
    labels: Array
    inertia: float
    n_iter: int


def squared_distances(x: Array, centroids: Array, x_sq: Array | None = None) -> Array:
    """``[N, k]`` squared Euclidean distances (``|x|^2 - 2 x.c + |c|^2``, clipped at 0).

    ``x_sq``: the precomputed ``|x|^2`` ``[N, 1]``, when called repeatedly on the same ``x``.
    """
    xp = backend_of(x).xp
    if x_sq is None:
        x_sq = (x * x).sum(axis=1, keepdims=True)
    return xp.maximum(x_sq + _offsets(x, centroids), 0)


def _offsets(x: Array, centroids: Array) -> Array:
    """``|c|^2 - 2 x.c`` ``[N, k]``: the squared distances up to the per-row ``|x|^2``."""
    return (centroids * centroids).sum(axis=1)[None, :] - 2 * (x @ centroids.T)


def assign(x: Array, centroids: Array) -> Array:
    """Index of the nearest centroid of every row of ``x``."""
    return _offsets(x, centroids.astype(x.dtype, copy=False)).argmin(axis=1)


def kmeans_plus_plus(x: Array, k: int, rng: np.random.Generator) -> Array:
    """Greedy k-means++ seeding (``2 + ln k`` candidates per step, as scikit-learn does)."""
    xp = backend_of(x).xp
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(axis=1, keepdims=True)
    centres = [int(rng.integers(n))]
    closest = squared_distances(x, x[centres], x_sq).ravel()  # [N]
    for _ in range(1, k):
        weights = to_host(closest).astype(np.float64)
        total = weights.sum()
        probs = weights / total if total > 0 else np.full(n, 1.0 / n)
        candidates = rng.choice(n, size=trials, p=probs)
        dists = xp.minimum(closest[:, None], squared_distances(x, x[candidates], x_sq))  # [N, trials]
        best = int(to_host(dists.sum(axis=0)).argmin())
        centres.append(int(candidates[best]))
        closest = dists[:, best]
    return x[xp.asarray(centres)].copy()


def kmeans(x: Array, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4) -> KMeansResult:
    """Fit ``k`` clusters to the rows of ``x`` ``[N, D]``.

    Stops when no centroid moves by more than ``tol`` times the mean feature variance.

    Raises:
        ValueError: fewer rows than clusters, or k < 1.
    """
    xp = backend_of(x).xp
    if k < 1 or x.shape[0] < k:
        raise ValueError(f"cannot fit {k} clusters to {x.shape[0]} points")
    x = x.astype(np.float32, copy=False)
    centroids = kmeans_plus_plus(x, k, np.random.default_rng(seed))
    threshold = tol * float(x.var(axis=0).mean())
    labels = assign(x, centroids)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        updated = _centroids(x, labels, centroids)
        shift = float(((updated - centroids) ** 2).sum(axis=1).max())
        centroids = updated
        labels = assign(x, centroids)
        if shift <= threshold:
            break
    inertia = float(xp.take_along_axis(squared_distances(x, centroids), labels[:, None], axis=1).sum())
    return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, n_iter=n_iter)


def fit(x: Array, k: int, seed: int = 0, max_iter: int = 100, engine: str = "emmae") -> KMeansResult:
    """k-means with the chosen implementation: ``emmae`` (this module, NumPy or CuPy),
    ``sklearn`` (scikit-learn, on the host) or ``cuml`` (cuML, on the GPU); one init, seeded.

    Raises:
        BackendError: the engine's library is not installed.
        ValueError: an unknown engine, or fewer points than clusters.
    """
    if engine == "emmae":
        return kmeans(x, k, seed=seed, max_iter=max_iter)
    backend = backend_of(x)
    if engine == "sklearn":
        try:
            from sklearn.cluster import KMeans
        except ImportError as exc:
            raise BackendError(f"k-means engine 'sklearn' needs scikit-learn: {exc}") from None
        model = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=max_iter).fit(to_host(x))
    elif engine == "cuml":
        model = cuml_kmeans()(n_clusters=k, n_init=1, random_state=seed, max_iter=max_iter).fit(x)
    else:
        raise ValueError(f"unknown k-means engine {engine!r}")
    centroids = backend.asarray(to_host(model.cluster_centers_), dtype=np.float32)
    labels = assign(x.astype(np.float32, copy=False), centroids)
    return KMeansResult(centroids=centroids, labels=labels, inertia=float(model.inertia_), n_iter=int(model.n_iter_))


def _centroids(x: Array, labels: Array, previous: Array) -> Array:
    """Mean of each cluster's rows; an emptied cluster keeps its previous centroid."""
    xp = backend_of(x).xp
    k = previous.shape[0]
    one_hot = (labels[None, :] == xp.arange(k)[:, None]).astype(np.float32)  # [k, N]
    counts = one_hot.sum(axis=1, keepdims=True)
    sums = one_hot @ x
    return xp.where(counts > 0, sums / xp.maximum(counts, 1), previous)
