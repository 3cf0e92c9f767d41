"""Session classes: rotation-free features, the judgement of each class, the user's overrule, and the outputs that show them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from emmae.config import EmmaeConfig
from emmae.io.mrc import read_micrograph
from emmae.io.truth import read_centres
from emmae.runtime.commands import pick as cli
from emmae.runtime.picking import classes as C
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.picker import scored_candidates
from emmae.synth import SynthParams, write_session

DIAMETER = 30.0
UCSF = Path(__file__).resolve().parents[2] / "shared" / "data" / "junk" / "UCSF-1142"


def disks(centres: np.ndarray, diameters: np.ndarray, depths: np.ndarray, shape=(512, 512), noise=0.0, seed=0) -> np.ndarray:
    """An image (background 0) with a dark disk per centre, plus Gaussian noise of SD ``noise``."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = np.random.default_rng(seed).normal(0, noise, shape) if noise else np.zeros(shape)
    for (x, y), d, depth in zip(centres, diameters, depths):
        image -= depth * (np.hypot(cols - x, rows - y) <= d / 2)
    return image.astype(np.float32)


def grid(count: int, spacing: float, offset: float = 40.0) -> np.ndarray:
    side = int(np.ceil(np.sqrt(count)))
    return np.array([(offset + spacing * (i % side), offset + spacing * (i // side)) for i in range(count)], np.float64)


@pytest.mark.parametrize("fraction", [1 / 3, 1 / 2, 2 / 3, 1.0])
def test_a_dark_disk_responds_most_at_its_own_size(fraction):
    image = disks(np.array([[100.0, 100.0]]), np.array([fraction * DIAMETER]), np.array([1.0]), shape=(200, 200))
    response = C.image_features(image, np.array([[100.0, 100.0]]), DIAMETER)[0, : len(C.SCALES_DIAMETERS)]
    assert int(np.argmax(response)) == C.SCALES_DIAMETERS.index(fraction)
    assert response.max() > 0  # positive on a dark centre


def test_features_ignore_in_plane_rotation():
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), 2)
    turned = np.ascontiguousarray(np.rot90(image))  # (x, y) -> (y, 255 - x)
    centre = np.array([[120.0, 131.0]])
    at_turned = np.array([[131.0, 255 - 120.0]])
    a, b = C.image_features(image, centre, DIAMETER), C.image_features(turned, at_turned, DIAMETER)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], atol=0.02 * np.abs(a).max())  # 90 degrees: a shift of the 24 angles


def session_of(kinds: dict[str, tuple[int, float, float]], noise=0.05, count=6):
    """Classes fitted on one image holding, per kind, (how many, diameter in particle diameters, depth)."""
    diameters, depths, names = [], [], []
    spacing = 2.2 * DIAMETER * 1.6
    total = sum(n for n, _, _ in kinds.values())
    xy = grid(total, spacing)
    shape = (int(xy[:, 1].max() + 80), int(xy[:, 0].max() + 80))
    for name, (n, size, depth) in kinds.items():
        diameters += [size * DIAMETER] * n
        depths += [depth] * n
        names += [name] * n
    image = disks(xy, np.array(diameters), np.array(depths), shape, noise)
    features = C.image_features(image, xy, DIAMETER)
    merit = np.where(np.array(names) == "particle", 0.9, 0.4)
    classes = C.fit_classes(features, None, C.montage_boxes(image, xy, DIAMETER), merit, count, seed=0)
    return classes, classes.assign(features), np.array(names)


def verdicts(classes, labels, names) -> dict[str, set[bool]]:
    kept = classes.kept_mask(labels)
    return {name: set(kept[names == name].tolist()) for name in set(names)}


def test_particles_are_kept_and_far_darker_or_empty_classes_dropped():
    classes, labels, names = session_of({"particle": (60, 0.6, 1.0), "dark": (20, 0.6, 6.0), "empty": (20, 0.6, 0.0)})
    assert classes.judged
    assert verdicts(classes, labels, names) == {"particle": {True}, "dark": {False}, "empty": {False}}
    reasons = {c.index: " ".join(c.reasons) for c in classes.classes}
    assert all("far darker" in reasons[int(k)] for k in set(labels[names == "dark"]))
    assert all(reasons[int(k)].startswith("empty") for k in set(labels[names == "empty"]))
    assert all(classes.classes[int(k)].empty for k in set(labels[names == "empty"]))


def test_candidates_on_a_dark_body_are_dropped():
    classes, labels, names = session_of({"particle": (60, 0.6, 1.0), "body": (20, 3.0, 2.5)})
    assert verdicts(classes, labels, names) == {"particle": {True}, "body": {False}}
    assert all(classes.classes[int(k)].reasons for k in set(labels[names == "body"]))


def test_a_session_too_faint_to_judge_keeps_every_class():
    classes, labels, names = session_of({"particle": (60, 0.6, 0.02), "dark": (20, 0.6, 0.12)}, noise=1.0)
    assert not classes.judged
    assert all(c.kept and not c.reasons for c in classes.classes)


def test_a_users_keep_and_drop_overrule_the_session():
    classes, labels, names = session_of({"particle": (60, 0.6, 1.0), "dark": (20, 0.6, 6.0)})
    dark_class = int(labels[names == "dark"][0])
    particle_class = int(labels[names == "particle"][0])
    assert not classes.kept_mask(np.array([dark_class]))[0]
    assert classes.kept_mask(np.array([dark_class]), keep=(dark_class,))[0]
    assert not classes.kept_mask(np.array([particle_class]), drop=(particle_class,))[0]
    assert classes.kept_mask(np.array([-1]))[0]  # unclassified candidates (older files) are kept


def test_classes_round_trip_and_are_cut_by_scored_candidates():
    classes, labels, names = session_of({"particle": (60, 0.6, 1.0), "dark": (20, 0.6, 6.0)})
    again = C.SessionClasses.from_dict(json.loads(json.dumps(classes.to_dict())))
    assert again.kept == classes.kept and again.judged == classes.judged
    np.testing.assert_allclose(again.centroids, classes.centroids)
    np.testing.assert_array_equal(again.assign(C.image_features(disks(grid(4, 80), np.full(4, 18.0), np.ones(4)), grid(4, 80), DIAMETER)),
                                  classes.assign(C.image_features(disks(grid(4, 80), np.full(4, 18.0), np.ones(4)), grid(4, 80), DIAMETER)))
    dark_class = int(labels[names == "dark"][0])
    table = np.array([[10, 10, 1.0, 0.9, 1.0, dark_class], [50, 50, 1.0, 0.9, 1.0, (dark_class + 1) % len(classes.classes)]], np.float64)
    post = EmmaeConfig().postprocess
    kept = tuple(k for k in classes.kept if k != dark_class)
    _, typical = scored_candidates(table, post, kept)
    assert typical.tolist() == [False, (dark_class + 1) % len(classes.classes) in kept]
    _, typical = scored_candidates(table, post.model_copy(update={"keep_classes": (dark_class,)}), kept)
    assert typical[0]
    _, typical = scored_candidates(table[:, :5], post, kept)  # saved before session classes: nothing cut by class
    assert typical.all()


@pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
def test_pick_writes_the_montage_and_rethreshold_drops_classes_by_number(tmp_path):
    mics, out = tmp_path / "mics", tmp_path / "picks"
    write_session(mics, 2, SynthParams(shape=(512, 512), diameter_px=28.0, pixel_size_A=2.0, snr=0.3), seed=2)
    assert cli.main([str(mics), "--diameter-A", "56", "--out", str(out)]) == cli.EXIT_OK
    summary = json.loads((out / "emmae-session.json").read_text())["summary"]["classes"]
    assert summary["count"] == len(summary["each"]) and summary["kept"]
    montage = cv2.imread(str(out / "emmae-classes.png"))
    assert montage is not None and montage.shape[0] > 100
    before = sum(len(read_centres(p)) for p in out.glob("*_autopick.star"))
    assert before > 0
    kept = ",".join(str(k) for k in summary["kept"])
    assert cli.main(["--rethreshold", str(out), "--drop-classes", kept]) == cli.EXIT_OK
    assert sum(len(read_centres(p)) for p in out.glob("*_autopick.star")) == 0
    assert cli.main(["--rethreshold", str(out), "--drop-classes", ""]) == cli.EXIT_OK
    assert sum(len(read_centres(p)) for p in out.glob("*_autopick.star")) == before
    with pytest.raises(SystemExit) as stop:  # argparse's one line and exit status 2, not a traceback
        cli.main(["--rethreshold", str(out), "--keep-classes", "x"])
    assert stop.value.code == 2


@pytest.mark.real
@pytest.mark.skipif(not UCSF.is_dir() or not default_bundle_path().is_file(), reason="no ../shared/data/junk/UCSF-1142 or no bundled model")
@pytest.mark.parametrize("diameter_px", [20, 40])
def test_real_contamination_is_not_picked(tmp_path, diameter_px):
    """UCSF-1142: a large ice/contamination body (its mask); before session classes 17 of 295 picks fell in it at 32 px."""
    mic = tmp_path / "mics" / "micrograph.mrc"
    mic.parent.mkdir()
    shutil.copy(UCSF / "micrograph.mrc", mic)
    out = tmp_path / "picks"
    assert cli.main([str(mic), "--diameter-px", str(diameter_px), "--out", str(out)]) == cli.EXIT_OK
    xy = np.round(read_centres(out / "micrograph_autopick.star")).astype(int)
    mask = read_micrograph(UCSF / "junk_mask.mrc").data > 0.5
    inside = int(mask[xy[:, 1].clip(0, mask.shape[0] - 1), xy[:, 0].clip(0, mask.shape[1] - 1)].sum())
    assert len(xy) > 20
    assert inside <= max(1, 0.01 * len(xy))


def test_the_web_view_shows_a_users_overrule():
    from emmae.runtime.web.folder import overruled

    session = {"id": "s", "classes": {"kept": [0, 1], "count": 3, "judged": True,
                                      "each": [{"class": 0, "kept": True, "why": "like the session's particles"},
                                               {"class": 1, "kept": True, "why": "like the session's particles"},
                                               {"class": 2, "kept": False, "why": "far darker"}]}}
    config = EmmaeConfig.model_validate({"postprocess": {"keep_classes": [2], "drop_classes": [1]}})
    shown = overruled(session, config)["classes"]
    assert shown["kept"] == [0, 2]
    assert [c["kept"] for c in shown["each"]] == [True, False, True]
    assert shown["each"][1]["why"].startswith("dropped by you") and shown["each"][2]["why"].startswith("kept by you")
    assert overruled(session, EmmaeConfig()) is session


def test_a_class_both_kept_and_dropped_by_the_user_is_dropped_everywhere():
    from emmae.runtime.web.folder import overruled

    classes, labels, names = session_of({"particle": (60, 0.6, 1.0), "dark": (20, 0.6, 6.0)})
    particle_class = int(labels[names == "particle"][0])
    assert not classes.kept_mask(np.array([particle_class]), keep=(particle_class,), drop=(particle_class,))[0]
    assert not classes.montage(keep=(particle_class,), drop=(particle_class,))[2][particle_class]
    session = {"classes": {"kept": [0], "count": 1, "judged": True, "each": [{"class": 0, "kept": True, "why": "like the session's particles"}]}}
    shown = overruled(session, EmmaeConfig.model_validate({"postprocess": {"keep_classes": [0], "drop_classes": [0]}}))["classes"]["each"][0]
    assert not shown["kept"] and shown["why"].startswith("dropped by you")
