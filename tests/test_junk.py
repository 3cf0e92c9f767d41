"""Junk that facility sessions hold beside the particles: the synthetic junk, the latent vetting and the figure of merit.

Each piece against a reference (float64 NumPy, a hand-built population), then golden
sessions picked end to end with the bundled model: the picks avoid the junk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from emmae.config import EmmaeConfig
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.localise import Calibration, calibrate, otsu_threshold
from emmae.io.picks import Picks, load_picks, save_picks
from emmae.runtime.picking.picker import encode, fit, pick, prepare, repick, scored_candidates
from emmae.runtime.picking.postprocess import Candidates, drop_clumps
from emmae.runtime.picking.session import Session
from emmae.runtime.picking.cluster import smooth_latents
from emmae.runtime.picking.vetting import DESCRIPTOR_WINDOW, Population, descriptors, fit_population
from emmae.synth import SynthParams, make_micrograph, write_micrograph_with_truth

from .test_golden import matched

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


# ---------------------------------------------------------------- synthetic junk


def test_dark_objects_are_as_dark_as_asked_and_in_the_junk_mask():
    params = SynthParams(shape=(512, 512), diameter_px=32, n_particles=40, snr=1.0, ice_gradient=0.0, n_contaminants=3,
                         contaminant_contrast=(5.0, 5.0), contaminant_width_diameters=(2.0, 2.0))
    synth = make_micrograph(params, seed=1)
    plain = make_micrograph(SynthParams(**{**params.__dict__, "contaminant_contrast": None, "n_contaminants": 0}), seed=1)
    assert synth.junk is not None and plain.junk is None
    smooth = ndi.uniform_filter(synth.image.astype(np.float64), 9)
    background = np.median(smooth[~ndi.binary_dilation(synth.junk, iterations=20)])
    core = ndi.binary_erosion(synth.junk, iterations=12)
    dark = 1 - np.median(smooth[core]) / background  # the objects' darkening
    rows, cols = np.round(synth.centres_xy[:, 1]).astype(int), np.round(synth.centres_xy[:, 0]).astype(int)
    particle = 1 - np.median(smooth[rows, cols]) / background
    assert core.any() and 2.5 < dark / particle < 10  # 5x, blurred by the smoothing and shot noise
    assert not synth.junk[rows, cols].any()  # no particle on junk


def test_carbon_only_and_aggregates_are_junk_not_truth(tmp_path):
    carbon = make_micrograph(SynthParams(shape=(256, 256), diameter_px=24, n_particles=0, carbon_edge=True, carbon_fraction=(1.0, 1.0)), seed=2)
    assert carbon.junk is not None and carbon.junk.mean() > 0.95 and len(carbon.centres_xy) == 0
    clumps = make_micrograph(SynthParams(shape=(512, 512), diameter_px=24, n_particles=60, snr=1.0, n_aggregates=3), seed=3)
    assert clumps.junk is not None and 0 < clumps.junk.mean() < 0.2
    assert not clumps.junk[np.round(clumps.centres_xy[:, 1]).astype(int), np.round(clumps.centres_xy[:, 0]).astype(int)].any()
    mrc, _ = write_micrograph_with_truth(tmp_path, "clumps", clumps)
    np.testing.assert_array_equal(np.load(tmp_path / "clumps_junk.npy"), clumps.junk)
    assert mrc.is_file() and not (tmp_path / "plain_junk.npy").exists()


def test_old_synthetic_micrographs_are_unchanged_by_the_junk_options():
    params = SynthParams(shape=(256, 256), diameter_px=24, n_particles=20, carbon_edge=True, n_contaminants=2)
    a, b = make_micrograph(params, seed=9), make_micrograph(SynthParams(**{**params.__dict__, "n_aggregates": 0}), seed=9)
    np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("field, value", [("carbon_fraction", (0.5, 0.2)), ("contaminant_contrast", (0.0, 2.0)), ("n_aggregates", -1),
                                          ("contaminant_width_diameters", (1.0,))])
def test_junk_options_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        SynthParams(**{field: value})


# ---------------------------------------------------------------- vetting and figure of merit


def test_population_distance_is_the_mahalanobis_distance_in_its_axes(rng):
    points = rng.normal(size=(500, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    population = fit_population(points, components=6, keep=1.0, rounds=1)
    covariance = np.cov(points.T, bias=True)
    centred = points[:10] - points.mean(axis=0)
    reference = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance), centred)
    np.testing.assert_allclose(population.distance2(points[:10]), reference, rtol=1e-6)
    again = Population.from_dict(json.loads(json.dumps(population.to_dict())))
    np.testing.assert_allclose(again.distance2(points[:10]), reference, rtol=1e-6)


def test_population_is_not_widened_by_a_minority_of_junk(rng):
    typical = rng.normal(size=(900, 16))
    junk = rng.normal(size=(100, 16)) + 12.0  # far, and a tenth of the candidates
    population = fit_population(np.concatenate([typical, junk]), components=8)
    assert np.mean(population.distance2(typical) <= 40) > 0.97
    assert np.all(population.distance2(junk) > 40)
    assert fit_population(typical[:10], components=8) is None  # too few to fit


def test_descriptors_read_the_smoothed_latent_under_each_candidate_less_the_micrographs_mean():
    latents = np.zeros((8, 8, 3), np.float32)
    latents[2:4, 4:6] = [1.0, 2.0, 3.0]  # a 2 x 2 block of latents: grid pixels x 16-23, y 8-15 (patch 4)
    found = descriptors(latents, np.array([[17.0, 9.0], [1.0, 1.0]]), patch_px=4)
    centre = latents.reshape(-1, 3).mean(axis=0)  # the micrograph's own level is taken out
    assert found.shape == (2, 3) and found.dtype == np.float32
    assert found[0, 2] + centre[2] > 0.5
    np.testing.assert_allclose(found[1], -centre, rtol=1e-6)


def test_descriptors_equal_the_whole_smoothed_map_read_under_the_candidates(rng):
    latents = rng.normal(size=(9, 7, 5)).astype(np.float32)
    xy = np.array([[0.0, 0.0], [27.9, 35.9], [13.0, 20.0], [27.0, 0.0], [0.0, 35.0]])  # corners, edges and inside (patch 4)
    reference = smooth_latents(latents, DESCRIPTOR_WINDOW)[(xy[:, 1] // 4).astype(int), (xy[:, 0] // 4).astype(int)]
    np.testing.assert_allclose(descriptors(latents, xy, patch_px=4), reference - latents.reshape(-1, 5).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_figure_of_merit_ranks_and_is_calibrated_per_session(rng):
    values = np.concatenate([rng.normal(0, 1, 2000), rng.normal(6, 1, 300)])
    calibration = calibrate(values)
    cut, high = otsu_threshold(values), values[values > otsu_threshold(values)]
    merit = calibration.figure_of_merit(np.array([cut, np.median(high), 2 * cut - np.median(high)]))
    np.testing.assert_allclose(merit, [0.5, 0.9, 0.1], atol=1e-9)
    ranked = calibration.figure_of_merit(np.sort(values))
    assert np.all(np.diff(ranked) >= 0) and np.mean(ranked > 0.99) < 0.2  # monotone, not saturated
    assert calibrate(np.ones(3)) is None
    empty = Calibration(calibration.cut, calibration.scale).figure_of_merit(rng.normal(0, 1, 500))  # an empty micrograph's peaks
    assert np.mean(empty >= 0.5) < 0.05


def test_candidates_saved_before_calibration_are_scored_per_micrograph():
    post = EmmaeConfig().postprocess
    old = np.column_stack([np.arange(10.0), np.arange(10.0), np.r_[np.zeros(5), np.full(5, 10.0)]])
    found, typical = scored_candidates(old, post)
    assert typical.all() and np.all(found.score[5:] >= 0.5) and np.all(found.score[:5] <= 0.5)
    new = np.column_stack([old, np.linspace(0, 1, 10), np.r_[np.full(9, 3.0), 99.0]])
    found, typical = scored_candidates(new, post)
    np.testing.assert_array_equal(found.score, np.linspace(0, 1, 10))
    assert typical.tolist() == [True] * 9 + [False]
    _, unvetted = scored_candidates(new, post.model_copy(update={"latent_vetting": False}))
    assert unvetted.all()


def test_clumps_of_overlapping_picks_are_dropped_pairs_are_not():
    clump = [[100, 100], [110, 100], [105, 108], [300, 300], [310, 300], [500, 500]]  # a 3-clump, a pair, a single
    found = Candidates(np.array(clump, np.float64), np.ones(6))
    kept = drop_clumps(found, overlap_px=12.0, size=3)
    assert sorted(map(tuple, kept.xy.tolist())) == [(300, 300), (310, 300), (500, 500)]
    assert len(drop_clumps(found, overlap_px=12.0, size=0)) == 6


def test_a_session_saved_before_vetting_still_loads():
    session = Session(centroids=np.zeros((3, 4), np.float32), particle_cluster=1, cluster_scores=(0.1, 0.2, 0.3), level_scores={3: [0.1, 0.2, 0.3]},
                      confidence=0.5, ambiguous=False, profile=np.linspace(-1, 0, 5), diameter_grid_px=20.0, micrographs=2)
    data = json.loads(session.to_json())
    for key in ("calibration", "population"):
        data.pop(key)
    old = Session.from_json(json.dumps(data))
    assert old.calibration is None and old.population is None and old.digest() == session.digest()


# ---------------------------------------------------------------- golden junk sessions (bundled model)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.open(None)


def pick_session(encoder: Encoder, micrographs: list, diameter: float, overrides: list[dict]) -> list[list[Picks]]:
    """Each micrograph encoded once, then picked under each override with its own session fitted on them all."""
    configs = [EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}, **override}) for override in overrides]
    encoded = [encode(prepare(m.image, configs[0], encoder, name=f"m{i}", pixel_size_A=1.0), encoder) for i, m in enumerate(micrographs)]
    out = []
    for config in configs:
        session = fit(encoded, config, encoder)
        out.append([pick(e, config, encoder, session) for e in encoded])
    return out


def junk_share_and_recall(micrographs: list, picks: list[Picks], diameter: float) -> tuple[float, float, int]:
    on_junk = total = found = truths = 0
    for m, p in zip(micrographs, picks):
        total += len(p.xy)
        truths += len(m.centres_xy)
        found += round(matched(m.centres_xy, p.xy, 0.2 * diameter) * len(m.centres_xy)) if len(m.centres_xy) else 0
        if m.junk is not None and len(p.xy):
            near = ndi.distance_transform_edt(~m.junk)[np.round(p.xy[:, 1]).astype(int), np.round(p.xy[:, 0]).astype(int)]
            on_junk += int(np.sum(near <= 0.25 * diameter))
    return on_junk / max(total, 1), found / max(truths, 1), total


JUNK = {
    "dark contaminants among faint particles": (60.0, [{"n_particles": 100, "snr": 0.02, "n_contaminants": 10, "contaminant_contrast": (3.0, 10.0),
                                                        "contaminant_width_diameters": (0.5, 3.0)}] * 4),
    "carbon edges and a carbon-only micrograph": (40.0, [{"n_particles": 110, "snr": 0.1, "carbon_edge": True}] * 4
                                                  + [{"n_particles": 0, "snr": 0.1, "carbon_edge": True, "carbon_fraction": (1.0, 1.0)},
                                                     {"n_particles": 180, "snr": 0.1}]),
    "empty and crystalline-ice micrographs": (40.0, [{"n_particles": 180, "snr": 0.1}] * 3 + [{"n_particles": 0, "snr": 0.1},
                                              {"n_particles": 0, "snr": 0.1, "n_contaminants": 14, "contaminant_contrast": (2.0, 4.0)}]),
}


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("kind", list(JUNK))
def test_golden_picks_avoid_the_junk(encoder, kind):
    diameter, fields = JUNK[kind]
    micrographs = [make_micrograph(SynthParams(shape=(1024, 1024), diameter_px=diameter, pixel_size_A=1.0, **f), seed=20 + i) for i, f in enumerate(fields)]
    shipped, without = pick_session(encoder, micrographs, diameter, [{}, {"postprocess": {"latent_vetting": False}}])
    share, recall, count = junk_share_and_recall(micrographs, shipped, diameter)
    assert share <= 0.05 and recall >= 0.75, f"{kind}: {share:.1%} of {count} picks on junk, recall {recall:.2f}"
    unused, _, _ = junk_share_and_recall(micrographs, without, diameter)
    assert unused > share, f"{kind}: the latents should keep picks off junk ({unused:.1%} without them, {share:.1%} with)"


@needs_model
def test_rethreshold_and_vetting_survive_a_save(encoder, tmp_path):
    synth = make_micrograph(SynthParams(shape=(512, 512), diameter_px=32, pixel_size_A=1.0, n_particles=60, snr=0.2), seed=4)
    picks = pick_session(encoder, [synth], 32.0, [{}])[0][0]
    assert picks.grid_candidates.shape[1] == 6 and np.isfinite(picks.grid_candidates[:, 4]).all()  # x, y, match, merit, latent distance, class
    save_picks(tmp_path / "p.npz", picks)
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": 32.0}})
    again = repick(load_picks(tmp_path / "p.npz"), config)
    np.testing.assert_allclose(again.xy, picks.xy)
    strict = repick(again, config.model_copy(update={"postprocess": config.postprocess.model_copy(update={"latent_limit": 1e-9})}))
    assert len(strict.xy) == 0  # every candidate is vetted against the limit
