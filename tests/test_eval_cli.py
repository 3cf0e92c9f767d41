"""emmae-eval: which files it scores, recorded coordinate switches, diameters."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from emmae.config import config_record, validate_config
from emmae.io.picks import transform_xy, write_box, write_micrographs, write_relion_coordinates
from emmae.runtime.commands import evaluate

SHAPE = (400, 600)  # ny, nx
CENTRES = np.array([[x, y] for x in range(60, 560, 100) for y in range(60, 360, 100)], dtype=np.float64)


def _report(tmp_path, *extra) -> dict:
    path = tmp_path / "report.json"
    assert evaluate.main(["--picks", str(tmp_path / "picks"), "--truth", str(tmp_path / "truth"), "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "picks").mkdir()
    (tmp_path / "truth").mkdir()
    write_relion_coordinates(tmp_path / "truth" / "mic_1.star", CENTRES, np.ones(len(CENTRES)))
    return tmp_path


def test_the_star_picks_are_scored_by_default_not_another_format(folders):
    write_relion_coordinates(folders / "picks" / "mic_1_autopick.star", CENTRES, np.ones(len(CENTRES)))
    write_box(folders / "picks" / "mic_1.box", CENTRES[::-1] + 45.0, 40)  # a different (wrong) set in another format
    report = _report(folders, "--diameter-px", "40")
    assert report["micrographs"][0]["picks_file"].endswith("mic_1_autopick.star")
    assert report["pooled"]["one-to-one"]["f1"] == 1.0
    boxes = _report(folders, "--diameter-px", "40", "--picks-format", "box")
    assert boxes["micrographs"][0]["picks_file"].endswith("mic_1.box")
    assert boxes["pooled"]["one-to-one"]["f1"] == 0.0


def test_a_recorded_flip_and_scale_are_undone(folders):
    output = validate_config({"output": {"flip_y": True, "coordinate_scale": 2.0}})
    write_relion_coordinates(folders / "picks" / "mic_1_autopick.star", transform_xy(CENTRES, SHAPE, output.output), np.ones(len(CENTRES)))
    (folders / "picks" / "emmae-config.json").write_text(json.dumps(config_record(output, ["emmae-pick"])))
    write_micrographs(folders / "picks" / "micrographs.star", [("Movies/mic_1.mrc", SHAPE, 1.5)])
    assert _report(folders, "--diameter-px", "40")["pooled"]["one-to-one"]["f1"] == 1.0


def test_a_flip_that_cannot_be_undone_is_warned_about(folders, caplog):
    output = validate_config({"output": {"flip_y": True}})
    write_relion_coordinates(folders / "picks" / "mic_1_autopick.star", transform_xy(CENTRES, SHAPE, output.output), np.ones(len(CENTRES)))
    (folders / "picks" / "emmae-config.json").write_text(json.dumps(config_record(output, ["emmae-pick"])))
    report = _report(folders, "--diameter-px", "40")  # no micrographs.star: the heights are unknown
    assert report["not_unflipped"] == ["mic_1"]
    assert report["pooled"]["one-to-one"]["f1"] < 1.0
    assert any(r.levelno == logging.WARNING and "--flip-y" in r.getMessage() for r in caplog.records)


def test_diameters(folders, caplog):
    write_relion_coordinates(folders / "picks" / "mic_1_autopick.star", CENTRES + [8.0, 0.0], np.ones(len(CENTRES)))
    args = ["--picks", str(folders / "picks"), "--truth", str(folders / "truth")]
    for bad in (["--diameter-px", "0"], ["--diameter-px", "-5"], ["--diameter-A", "0", "--pixel-size-A", "2"], []):
        assert evaluate.main(args + bad) == 2
    assert evaluate.main(args + ["--diameter-A", "80"]) == 2  # no pixel size anywhere
    assert any("--pixel-size-A" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    by_px = _report(folders, "--diameter-px", "40")
    by_A = _report(folders, "--diameter-A", "80", "--pixel-size-A", "2")
    assert by_A["diameter_px"] == 40.0 and by_A["pooled"] == by_px["pooled"]
    write_micrographs(folders / "picks" / "micrographs.star", [("mic_1.mrc", SHAPE, 2.0)])
    assert _report(folders, "--diameter-A", "80")["pooled"] == by_px["pooled"]  # the pixel size the picks recorded
    assert by_px["pooled"]["one-to-one"]["f1"] > _report(folders, "--diameter-px", "12")["pooled"]["one-to-one"]["f1"]


def test_of_several_truth_formats_the_star_is_read_unless_another_is_chosen(folders):
    write_relion_coordinates(folders / "picks" / "mic_1_autopick.star", CENTRES, np.ones(len(CENTRES)))
    write_box(folders / "truth" / "mic_1.box", CENTRES[::-1] + 45.0, 40)  # a different set in another format
    assert _report(folders, "--diameter-px", "40")["pooled"]["one-to-one"]["f1"] == 1.0
    assert _report(folders, "--diameter-px", "40", "--truth-format", "box")["pooled"]["one-to-one"]["f1"] == 0.0
