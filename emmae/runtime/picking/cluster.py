"""Per-micrograph clustering (method section 3): latent smoothing and hierarchical k-means.

Starting from the train-set clusters' particle cluster, each level (k = 3, 4, 5)
re-clusters the micrograph's smoothed latents and keeps the cluster that overlaps
the previous level's particle region most inside the central region; a runner-up
replaces it when it is "purer" (smaller size / overlap). Written once for NumPy and
CuPy; each level is fitted on a seeded sample of the latents and then assigns all.
"""

from __future__ import annotations

import numpy as np

from emmae.backend import backend_of, to_host
from emmae.config import ClusterConfig
from emmae.runtime.kernels.filters import Array, box_kernel
from emmae.runtime.kernels.kmeans import assign, fit


def smoothing_window(diameter_grid_px: float, patch_px: int) -> int:
    """The latent smoothing window: 4 latents when a particle spans at least 8 latents, else 2.

    The reference switches to 4 only from 16 latents (64 grid px); on the real data 4 is
    better for both datasets (56 and 36 grid px): mean F1 over the train and valid
    splits 0.51 -> 0.57 (``bench/quality.py``), so the switch sits at 8.
    """
    return 4 if diameter_grid_px / patch_px >= 8 else 2


def smooth_latents(latents: Array, window: int) -> Array:
    """Centred ``window x window`` mean of a latent map ``[h, w, D]``, borders reflected (no zero rim)."""
    out = latents.astype(np.float32)
    for axis in (0, 1):
        out = _correlate_axis(out, box_kernel(float(window)), axis)
    return out


ROWS_PER_PASS = 16  # latent-map rows smoothed at a time along axis 0 (float64 temporaries of 16 rows: 4 MB at 256 x 128)


def _correlate_axis(x: Array, kernel: np.ndarray, axis: int) -> Array:
    """Correlate along ``axis`` with a short odd kernel (REFLECT_101 borders: ndimage's "mirror").

    Along axis 0 of a latent map ``[h, w, D]`` with a symmetric kernel, whole rows are summed
    at once (ndimage walks each line of that axis alone, 128 KB apart), with ndimage's own
    arithmetic: ``x[i] k0 + (x[i-j] + x[i+j]) k_j`` for j from the outermost tap in, in float64
    from the float32 taps, rounded to float32: the same numbers, ~4x faster.
    """
    backend = backend_of(x)
    taps = np.asarray(kernel, dtype=np.float32).astype(np.float64)
    m = len(taps) // 2
    if axis != 0 or x.ndim != 3 or len(taps) % 2 == 0 or not np.array_equal(taps, taps[::-1]) or x.shape[0] <= m:
        return backend.ndimage.correlate1d(x, backend.asarray(kernel, dtype=np.float32), axis=axis, mode="mirror")
    xp, h = backend.xp, x.shape[0]
    rows = x.reshape(h, -1)  # [h, w * D]
    out = xp.empty(rows.shape, dtype=np.float32)

    def row(i: int) -> int:  # REFLECT_101
        return -i if i < 0 else 2 * (h - 1) - i if i >= h else i

    for r0 in range(0, h, ROWS_PER_PASS):
        r1 = min(h, r0 + ROWS_PER_PASS)
        block = rows[[row(i) for i in range(r0 - m, r1 + m)]].astype(np.float64)  # [r1 - r0 + 2m, w * D]
        total = block[m : m + r1 - r0] * taps[m]
        for j in range(m, 0, -1):
            total += (block[m - j : m - j + r1 - r0] + block[m + j : m + j + r1 - r0]) * taps[m - j]
        out[r0:r1] = total
    return out.reshape(x.shape)


def select_cluster(labels: Array, k: int, reference: Array, margin_fraction: float) -> int | None:
    """The reference rule: largest overlap with ``reference`` in the central region; the
    runner-up wins if its size / overlap is smaller. None when nothing overlaps."""
    xp = backend_of(labels).xp
    h, w = labels.shape
    my, mx = int(round(h * margin_fraction)), int(round(w * margin_fraction))
    centre = (slice(my, h - my), slice(mx, w - mx))
    inside = labels[centre][reference[centre]]
    if inside.size == 0:
        inside = labels[reference]
    overlap = to_host(xp.bincount(inside.ravel(), minlength=k))[:k].astype(float)
    sizes = to_host(xp.bincount(labels.ravel(), minlength=k))[:k].astype(float)
    order = np.argsort(-overlap, kind="stable")
    best, runner = int(order[0]), int(order[1])
    if overlap[best] == 0:
        return None
    if overlap[runner] > 0 and sizes[best] / overlap[best] > sizes[runner] / overlap[runner]:
        return runner
    return best


def particle_region(
    latents: Array, centroids: Array, particle_cluster: int, window: int, config: ClusterConfig
) -> Array:
    """Boolean ``[h, w]`` map of the latents in the micrograph's particle cluster."""
    xp = backend_of(latents).xp
    h, w, dim = latents.shape
    points = smooth_latents(latents, window).reshape(-1, dim)
    region = (assign(points, xp.asarray(centroids, dtype=np.float32)) == particle_cluster).reshape(h, w)
    rng = np.random.default_rng(config.seed)
    sample = points
    if len(points) > config.fit_points:
        sample = points[xp.asarray(np.sort(rng.choice(len(points), config.fit_points, replace=False)))]
    for k in config.levels:
        level = fit(sample, k, seed=config.seed, max_iter=config.max_iter, engine=config.engine)
        labels = assign(points, level.centroids).reshape(h, w)
        chosen = select_cluster(labels, k, region, config.centre_margin_fraction)
        if chosen is None:
            break
        region = labels == chosen
    return region
