"""emmae-pick and emmae-eval end to end on synthetic micrographs with the bundled model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile

from emmae.io.truth import read_centres
from emmae.runtime.commands import evaluate
from emmae.runtime.commands import pick as cli
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.synth import SynthParams, write_session

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mics")
    write_session(folder, 2, SynthParams(shape=(512, 512), diameter_px=28.0, pixel_size_A=2.0, snr=0.3), seed=2)
    return folder


@pytest.fixture(scope="module")
def picked(session, tmp_path_factory):
    out = tmp_path_factory.mktemp("picks")
    (session / "broken.mrc").write_bytes(b"not an mrc file" * 100)
    code = cli.main([str(session), "--diameter-A", "56", "--out", str(out), "--format", "star", "box", "cbox"])
    (session / "broken.mrc").unlink()
    return code, out


def test_bad_micrograph_is_skipped_not_fatal(picked):
    code, out = picked
    assert code == cli.EXIT_PARTIAL
    assert sorted(p.name for p in out.glob("*_autopick.star")) == ["mic_00000_autopick.star", "mic_00001_autopick.star"]


def test_outputs_parse_and_respect_the_minimum_distance(picked, session):
    _, out = picked
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert [name.endswith(f"mic_0000{i}.mrc") for i, name in enumerate(index["rlnMicrographName"])] == [True, True]
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    total = 0
    for stem in ("mic_00000", "mic_00001"):
        xy = read_centres(out / f"{stem}_autopick.star")
        total += len(xy)
        assert np.all((xy >= 0) & (xy < 512))
        if len(xy) > 1:
            d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
            assert d.min() >= 0.5 * 28.0  # no two kept picks closer than the minimum distance
        assert (out / f"{stem}.box").is_file() and (out / f"{stem}.cbox").is_file()
    assert len(particles) == total
    record = json.loads((out / "emmae-config.json").read_text())
    assert record["config"]["preprocess"]["diameter_A"] == 56 and record["argv"]


def test_flip_y_is_explicit(session, tmp_path, picked):
    _, out = picked
    flipped = tmp_path / "flipped"
    # the same micrographs, so the same session (its clusters and template are fitted on them)
    assert cli.main([str(session), "--diameter-px", "28", "--out", str(flipped), "--flip-y"]) == cli.EXIT_OK
    a, b = read_centres(out / "mic_00000_autopick.star"), read_centres(flipped / "mic_00000_autopick.star")
    np.testing.assert_allclose(b[:, 0], a[:, 0], atol=1e-2)
    np.testing.assert_allclose(b[:, 1], 511 - a[:, 1], atol=1e-2)


def test_rethreshold_without_encoding(picked, tmp_path):
    _, out = picked
    before = len(read_centres(out / "mic_00000_autopick.star"))
    assert cli.main(["--rethreshold", str(out), "--set", "postprocess.min_distance_diameters=2.0"]) == cli.EXIT_OK
    after = read_centres(out / "mic_00000_autopick.star")
    assert len(after) <= before
    if len(after) > 1:
        d = np.linalg.norm(after[:, None] - after[None], axis=-1) + np.eye(len(after)) * 1e9
        assert d.min() >= 2.0 * 28.0


def test_usage_errors(tmp_path):
    assert cli.main([str(tmp_path / "nothing"), "--diameter-px", "20", "--out", str(tmp_path / "o")]) == cli.EXIT_FAILED
    assert cli.main(["--diameter-px", "20", "--out", str(tmp_path / "o")]) == cli.EXIT_FAILED
    assert cli.main([str(tmp_path), "--set", "postprocess.area_fraction=3", "--out", str(tmp_path / "o")]) == cli.EXIT_FAILED


def test_eval_scores_truth_against_itself(session, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    for star in session.glob("*_truth.star"):
        (truth / star.name.replace("_truth", "")).write_bytes(star.read_bytes())
    assert evaluate.main(["--picks", str(truth), "--truth", str(truth), "--diameter-px", "28", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pooled"]["one-to-one"]["f1"] == 1.0 and report["pooled"]["nearest"]["f1"] == 1.0
    assert "pooled" in capsys.readouterr().out


def test_micrograph_sizes_are_recorded(picked):
    _, out = picked
    table = starfile.read(out / "micrographs.star", always_dict=True)["micrographs"]
    assert table["rlnImageSizeX"].tolist() == [512, 512] and table["rlnImageSizeY"].tolist() == [512, 512]
    assert table["rlnMicrographPixelSize"].tolist() == pytest.approx([2.0, 2.0])


def test_names_from_a_micrographs_star_are_kept_verbatim(session, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "MotionCorr" / "job002").mkdir(parents=True)
    (project / "MotionCorr" / "job002" / "mic_00000.mrc").write_bytes((session / "mic_00000.mrc").read_bytes())
    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/mic_00000.mrc"]})}, project / "corrected_micrographs.star")
    monkeypatch.chdir(project)
    out = tmp_path / "picks"
    assert cli.main(["corrected_micrographs.star", "--diameter-px", "28", "--out", str(out)]) == cli.EXIT_OK
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert index["rlnMicrographName"].tolist() == ["MotionCorr/job002/mic_00000.mrc"]
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert set(particles["rlnMicrographName"]) <= {"MotionCorr/job002/mic_00000.mrc"}
