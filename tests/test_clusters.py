"""k-means and the train-set particle-cluster choices."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.runtime.kernels.kmeans import assign, kmeans
from emmae.trainer.clusters import disk_mask, particle_cluster_by_prior, particle_cluster_by_reference


def _blobs(rng, centres, n=200, spread=0.3):
    points = np.concatenate([rng.normal(c, spread, (n, len(c))) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(len(centres)), n)
    return points, truth


def test_kmeans_recovers_separated_clusters(backend, host, rng):
    centres = np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=np.float32)
    points, truth = _blobs(rng, centres)
    fit = kmeans(backend.asarray(points), 4, seed=0)
    labels = host(fit.labels)
    # a perfect clustering up to relabelling: each true cluster maps to one label
    pairs = {(t, l) for t, l in zip(truth, labels, strict=True)}
    assert len(pairs) == 4 and len({l for _, l in pairs}) == 4
    np.testing.assert_allclose(np.sort(host(fit.centroids), axis=0), np.sort(centres, axis=0), atol=0.1)
    assert fit.inertia == pytest.approx(float(((points - centres[truth]) ** 2).sum()), rel=0.05)


def test_kmeans_is_reproducible_and_assign_matches(rng):
    points, _ = _blobs(rng, [[0, 0], [3, 3], [0, 4]], spread=1.0)
    a, b = kmeans(points, 3, seed=11), kmeans(points, 3, seed=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(assign(points, a.centroids), a.labels)
    with pytest.raises(ValueError, match="cannot fit 5 clusters to 3 points"):
        kmeans(points[:3], 5)


def test_disk_mask():
    mask = disk_mask((20, 30), np.array([[25.0, 4.0]]), 6.0)  # x = 25 (column), y = 4 (row)
    assert mask[4, 25] and mask[4, 28] and not mask[4, 29] and not mask[25 % 20, 4]
    assert mask.sum() == np.count_nonzero((np.indices((20, 30))[1] - 25) ** 2 + (np.indices((20, 30))[0] - 4) ** 2 <= 9)


def _label_map(rng):
    """Cluster 0 background, 1 particle-sized disks, 2 speckle noise, 3 one large region."""
    labels = np.zeros((128, 128), int)
    centres = np.array([[x, y] for x in range(12, 120, 24) for y in range(12, 60, 24)], float)
    labels[disk_mask(labels.shape, centres, 10.0)] = 1
    speckle = rng.random(labels.shape) < 0.05
    labels[speckle & (labels == 0)] = 2
    labels[80:, :] = 3
    return labels, centres


def test_prior_picks_the_particle_sized_cluster(rng):
    labels, _ = _label_map(rng)
    choice = particle_cluster_by_prior([labels], [10.0], 4)
    assert choice.cluster == 1 and choice.method == "prior"
    assert choice.scores[1] > 0.9 and max(choice.scores[0], choice.scores[2], choice.scores[3]) < 0.2


def test_reference_picks_the_enriched_cluster(rng):
    labels, centres = _label_map(rng)
    mask = disk_mask(labels.shape, centres, 10.0)
    choice = particle_cluster_by_reference(labels, mask, 4)
    assert choice.cluster == 1 and choice.scores[1] == pytest.approx(1 / mask.mean())


def test_kmeans_agrees_with_scikit_learn(rng):
    """Same data, one k-means++ init each, ten seeds: the partitions agree (adjusted Rand index).

    Either implementation may land in a poorer local optimum for some seed (one init, as the
    reference uses), so the comparison is over seeds, not bitwise.
    """
    pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    centres = rng.normal(0, 3, (5, 16))
    points = np.concatenate([rng.normal(c, 1.0, (400, 16)) for c in centres]).astype(np.float32)
    agreement, ratios = [], []
    for seed in range(10):
        ours = kmeans(points, 5, seed=seed)
        theirs = KMeans(n_clusters=5, n_init=1, random_state=seed).fit(points)
        agreement.append(adjusted_rand_score(theirs.labels_, ours.labels))
        ratios.append(ours.inertia / theirs.inertia_)
    assert np.median(agreement) > 0.99
    assert sum(a > 0.95 for a in agreement) >= 8
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("engine", ["emmae", "sklearn"])
def test_engines_behind_one_interface(rng, engine):
    pytest.importorskip("sklearn")
    from sklearn.metrics import adjusted_rand_score

    from emmae.runtime.kernels.kmeans import fit

    points, truth = _blobs(rng, [[0, 0], [6, 0], [0, 6]], spread=0.8)
    result = fit(points, 3, seed=0, engine=engine)
    assert result.centroids.shape == (3, 2)
    assert adjusted_rand_score(truth, result.labels) > 0.98


def test_unknown_or_missing_engine(rng, monkeypatch):
    import sys

    from emmae.errors import BackendError
    from emmae.runtime.kernels.kmeans import fit

    points, _ = _blobs(rng, [[0, 0], [6, 0]])
    with pytest.raises(ValueError, match="unknown k-means engine"):
        fit(points, 2, engine="faiss")
    monkeypatch.setitem(sys.modules, "cuml", None)
    monkeypatch.setitem(sys.modules, "cuml.cluster", None)
    with pytest.raises(BackendError, match="needs cuML"):
        fit(points, 2, engine="cuml")
