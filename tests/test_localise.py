"""Template localisation and the session's particle choice: each piece against a reference,
then end to end on crowded and on raw-contrast, non-square synthetic micrographs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.ndimage as ndi
import starfile

from emmae.config import EmmaeConfig
from emmae.io.mrc import write_micrograph
from emmae.runtime.commands import pick as cli
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking import localise
from emmae.runtime.picking.localise import (blob_response, confidence, find_peaks, learn_profile, match, matching_image, radial_profile,
                                            relative_change, template_from_profile)
from emmae.runtime.jobs import Job, Picker, pick_read
from emmae.runtime.outputs import SESSION_FILE, OutputFolder
from emmae.runtime.picking.builder import SessionBuilder
from emmae.runtime.picking.picker import encode, fit, pick, prepare
from emmae.runtime.picking.session import Session
from emmae.synth import SynthParams, make_micrograph, write_session

from .test_golden import matched

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


def disks(shape: tuple[int, int], centres_xy: np.ndarray, diameter: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for x, y in centres_xy:
        out[np.hypot(cols - x, rows - y) <= diameter / 2] = -1.0  # dark particles
    return out


def test_match_is_the_correlation_with_reflected_borders(rng):
    image = rng.normal(size=(40, 52)).astype(np.float32)
    template = rng.normal(size=(7, 7)).astype(np.float32)
    expected = ndi.correlate(image.astype(np.float64), template.astype(np.float64), mode="reflect")
    # scipy's "reflect" repeats the edge sample (half-sample symmetric); numpy's "reflect" does not
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(match(image, template)[inner], expected[inner], rtol=1e-4, atol=1e-4)


def test_blob_response_is_the_scale_normalised_laplacian_of_gaussian(rng):
    image = ndi.gaussian_filter(rng.normal(size=(96, 128)), 2).astype(np.float32)
    diameter = 12.0
    sigma = diameter / 2 / np.sqrt(2)
    expected = sigma**2 * ndi.gaussian_laplace(image.astype(np.float64), sigma, mode="reflect")
    got = blob_response(image, diameter)
    inner = (slice(16, -16), slice(16, -16))
    assert np.corrcoef(got[inner].ravel(), expected[inner].ravel())[0, 1] > 0.999
    np.testing.assert_allclose(got[inner], expected[inner], atol=0.02 * np.abs(expected).max())
    disk = disks((64, 64), np.array([[32.0, 32.0]]), diameter)
    peak = np.unravel_index(np.argmax(blob_response(disk, diameter)), disk.shape)
    assert peak == (32, 32)  # a dark disk of the diameter peaks at its centre


def test_template_is_zero_mean_unit_norm_and_round():
    template = template_from_profile(np.linspace(-1, 1, 11))
    assert template.shape == (21, 21)
    assert abs(template.sum()) < 1e-4 and np.sum(template**2) == pytest.approx(1, rel=1e-5)
    np.testing.assert_allclose(template, template.T, atol=1e-6)
    np.testing.assert_allclose(template, template[::-1], atol=1e-6)


def test_radial_profile_of_a_disk_steps_at_its_radius():
    image = disks((64, 64), np.array([[32.0, 32.0]]), 20.0)
    profile, count = radial_profile(image, np.array([[32.0, 32.0], [2.0, 2.0]]), 15)
    assert count == 1  # the centre too close to the edge is left out
    assert np.all(profile[:9] == -1) and np.all(profile[11:] == 0)


def test_confidence_is_monotonic_and_splits_two_classes(rng):
    values = np.concatenate([rng.normal(1, 0.2, 300), rng.normal(4, 0.3, 100)])
    score = confidence(values)
    order = np.argsort(values)
    assert np.all(np.diff(score[order]) >= -1e-12)
    assert np.all((score >= 0) & (score <= 1))
    assert np.mean(score[300:] > 0.5) > 0.97 and np.mean(score[:300] < 0.5) > 0.97
    assert np.all(confidence(np.array([1.0, 2.0])) == 0.5)


def test_learned_template_finds_touching_particles(rng):
    """Touching dark disks: the learned template's peaks are the centres, not the gaps."""
    diameter = 16.0
    centres = np.array([[x, y] for y in np.arange(20, 236, diameter) for x in np.arange(20 + (y // diameter % 2) * 8, 236, diameter)])
    keep = rng.random(len(centres)) < 0.7
    centres = centres[keep]
    image = disks((256, 256), centres, diameter - 1) + rng.normal(0, 0.3, (256, 256)).astype(np.float32)
    image = (image - image.mean()) / image.std()
    profile = learn_profile([image], diameter, iterations=2, top_fraction=0.3)
    assert profile[0] < profile[-1]  # dark centre, lighter surround
    found = find_peaks(match(image, template_from_profile(profile)), diameter / 2)
    strongest = found.xy[np.argsort(-found.score)[: len(centres)]]
    assert matched(centres, strongest, 0.2 * diameter) > 0.9


def test_several_images_learn_in_threads_the_profile_one_thread_learns(rng, monkeypatch):
    """Host images are matched in threads; the profile is the one a plain loop over them gives, bit for bit."""
    diameter = 16.0
    images = []
    for _ in range(4):
        centres = rng.uniform(20, 236, (40, 2))
        image = disks((256, 256), centres, diameter - 1) + rng.normal(0, 0.5, (256, 256)).astype(np.float32)
        images.append((image - image.mean()) / image.std())
    threaded = learn_profile(images, diameter, iterations=6, top_fraction=0.3, tolerance=0.0)
    monkeypatch.setattr(localise, "cpu_threads", lambda: 1)  # a pool of one thread
    single = learn_profile(images, diameter, iterations=6, top_fraction=0.3, tolerance=0.0)
    radius = len(threaded) - 1
    looped = localise._rounds(images, None, [np.zeros((0, 2))] * 4, diameter, radius, 6, 0.3, 0.0, map)  # no pool at all
    np.testing.assert_array_equal(threaded, looped)
    np.testing.assert_array_equal(single, looped)
    assert looped[0] < looped[-1]  # a particle profile, not an empty one


@needs_model
def test_alternating_profiles_end_as_the_full_rounds_would(encoder):
    """On this micrograph the strongest peaks swap between two sets from round 3 on. The
    rounds stop once a profile repeats, and give the profile that running every round gives
    (4 and 5 rounds run in full, before any repeat)."""
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": 56.0}})
    grid = prepare(make_micrograph(SynthParams(shape=(1024, 1024), diameter_px=56.0), seed=0).image, config, encoder).grid
    post = config.postprocess
    image = matching_image(grid.binned, grid.diameter_grid_px, post.match_sigma_diameters, post.contrast, post.match_clip_sigma)
    profiles = {k: learn_profile([image], grid.diameter_grid_px, k, post.template_top_fraction) for k in (4, 5, 30, 31)}
    assert relative_change(profiles[5], profiles[4]) > 1e-3  # two different profiles alternate
    np.testing.assert_array_equal(profiles[30], profiles[4])
    np.testing.assert_array_equal(profiles[31], profiles[5])


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.open()


def _alone(source, config, encoder):
    """One micrograph picked with a session fitted on it alone."""
    encoded = encode(prepare(source, config, encoder), encoder)
    return pick(encoded, config, encoder, fit([encoded], config, encoder))


@needs_model
def test_crowded_micrograph_is_picked(encoder):
    """40 % coverage, touching particles: the picks are the particles (0.2 diameters)."""
    diameter, shape = 40.0, (768, 768)
    count = int(0.4 * shape[0] * shape[1] / (np.pi * (diameter / 2) ** 2))
    synth = make_micrograph(SynthParams(shape=shape, diameter_px=diameter, pixel_size_A=2.0, n_particles=count, snr=0.3), seed=3)
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}})
    picks = _alone(synth.image, config, encoder)
    inner = synth.centres_xy[np.all((synth.centres_xy > diameter) & (synth.centres_xy < np.array(shape[::-1]) - diameter), axis=1)]
    assert len(inner) > 0.8 * count * 0.6
    assert matched(inner, picks.xy, 0.2 * diameter) >= 0.8  # recall away from the border margin
    assert matched(picks.xy, synth.centres_xy, 0.2 * diameter) >= 0.85  # precision
    assert np.all((picks.score >= 0) & (picks.score <= 1)) and picks.session["micrographs"] == 1


@needs_model
def test_raw_contrast_non_square_micrograph(encoder, tmp_path):
    """Raw counts (not normalised), 1240 x 1200 like EMPIAR-10146's frames, through an MRC file."""
    diameter, shape = 44.0, (600, 620)
    synth = make_micrograph(SynthParams(shape=shape, diameter_px=diameter, pixel_size_A=1.5, n_particles=60, snr=0.2, dose_e_per_A2=20), seed=5)
    path = tmp_path / "raw.mrc"
    write_micrograph(path, np.round(synth.image).astype(np.float32), 1.5)
    picks = _alone(path, EmmaeConfig.model_validate({"preprocess": {"diameter_A": 1.5 * diameter}}), encoder)
    assert picks.shape == shape
    inner = synth.centres_xy[np.all((synth.centres_xy > diameter) & (synth.centres_xy < np.array(shape[::-1]) - diameter), axis=1)]
    assert matched(inner, picks.xy, 0.2 * diameter) >= 0.8
    assert matched(picks.xy, synth.centres_xy, 0.2 * diameter) >= 0.85
    ny, nx = shape
    assert matched(inner, np.stack([picks.xy[:, 0], ny - 1 - picks.xy[:, 1]], axis=1), 0.2 * diameter) < 0.5  # a y flip would show


@needs_model
def test_one_session_choice_for_every_micrograph_of_a_batch(tmp_path):
    folder, out = tmp_path / "mics", tmp_path / "picks"
    write_session(folder, 3, SynthParams(shape=(512, 512), diameter_px=28.0, pixel_size_A=2.0, snr=0.3), seed=4)
    assert cli.main([str(folder), "--diameter-px", "28", "--out", str(out), "-q"]) == cli.EXIT_OK
    saved = json.loads((out / SESSION_FILE).read_text())
    record = saved["summary"]
    assert record["micrographs"] == 3 and 0 <= record["confidence"] <= 1 and len(saved["sample"]) == 3
    sessions = {json.loads(str(np.load(p)["meta"]))["session"]["id"] for p in out.glob("*_emmae.npz")}
    assert sessions == {record["id"]}
    before = {p.name: starfile.read(p) for p in out.glob("*_autopick.star")}
    assert len(before) == 3
    assert cli.main(["--rethreshold", str(out), "--threshold", "0.9", "-q"]) == cli.EXIT_OK
    for name, old in before.items():
        new = starfile.read(out / name)
        assert np.all(new["rlnAutopickFigureOfMerit"] >= 0.9) and len(new) <= len(old)
        # the same candidates and figures of merit, cut higher (the STAR rounds them to 4 decimals)
        coordinates = ["rlnCoordinateX", "rlnCoordinateY"]
        surely, maybe = (old[old["rlnAutopickFigureOfMerit"] >= cut][coordinates].to_numpy() for cut in (0.9001, 0.8999))
        picked = new[coordinates].to_numpy()
        assert all(np.any(np.all(np.isclose(picked, xy), axis=1)) for xy in surely)
        assert all(np.any(np.all(np.isclose(maybe, xy), axis=1)) for xy in picked)


@needs_model
def test_stream_session_freezes_after_n_and_survives_a_restart(encoder, tmp_path):
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": 28.0}, "cluster": {"session_micrographs": 2}})
    images = [make_micrograph(SynthParams(shape=(384, 384), diameter_px=28.0, snr=0.3), seed=s).image for s in range(4)]
    folder = OutputFolder(tmp_path)
    picker = Picker(config, encoder, builder=SessionBuilder(config, encoder.bundle.info.patch_px,
                                                             on_fixed=lambda session, names: folder.write_session(session, names)))
    ids = []
    for i, image in enumerate(images):
        picks, _ = pick_read(Job(tmp_path / f"m{i}.mrc", f"m{i}", f"m{i}"), prepare(image, config, encoder, name=f"m{i}"), picker)
        ids.append(picks.session["id"])
    assert ids[1] == ids[2] == ids[3] and (tmp_path / "emmae-session.json").is_file()  # frozen at the second micrograph
    restarted = SessionBuilder(config, encoder.bundle.info.patch_px, OutputFolder(tmp_path).read_session())
    assert restarted.frozen is not None and restarted.frozen.digest() == ids[1]
    again = Session.from_json(restarted.frozen.to_json())
    assert again.digest() == ids[1] and again.particle_cluster == restarted.frozen.particle_cluster


def test_stream_picks_again_what_provisional_sessions_picked(tmp_path, caplog):
    import logging
    import sqlite3

    from emmae.runtime.commands import stream as daemon
    from emmae.synth import write_session

    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 4, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3), seed=8)
    args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.1",
            "--progress", "plain", "--once", "--set", "cluster.session_micrographs=2"]
    with caplog.at_level(logging.INFO, logger="emmae.stream"):
        assert daemon.main(args) == 0
    again = [r.getMessage() for r in caplog.records if "picked with a provisional session" in r.getMessage()]
    # the first two, picked before the session was fixed (the second calls for its fit, which runs on a thread of
    # its own), and those that came while it was fitted
    repicked = sum(int(re.search(r"the (\d+) micrographs", line).group(1)) for line in again)
    assert 1 <= len(again) <= 2 and repicked in (2, 3, 4)
    frozen = json.loads((out / "emmae-session.json").read_text())["session"]
    rows = sqlite3.connect(out / "emmae-journal.sqlite").execute("SELECT path, state, session FROM micrographs").fetchall()
    assert sorted(r[0] for r in rows) == [m.name for m in mics]
    assert {(r[1], r[2]) for r in rows} == {("picked", Session.from_json(json.dumps(frozen)).digest())}
    picks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("picked ")]
    assert len(picks) == len(mics) + repicked and "4 picked, 0 failed" in picks[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="emmae.stream"):  # a restart has nothing left to do
        assert daemon.main(args) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("picked ")]
