"""emmae-pick on broken set-ups: unwritable outputs, unresolved STAR rows, re-thresholding, folders, flags."""

from __future__ import annotations

import errno
import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import starfile

from emmae.config import validate_config
from emmae.io.picks import transform_xy
from emmae.io.truth import read_centres
from emmae.runtime.commands import pick as cli
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.errors import OutputError
from emmae.io.picks import load_picks
from emmae.runtime.outputs import FAILED_FILE, OutputFolder
from emmae.runtime.picking.picker import repick
from emmae.synth import SynthParams, write_session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0)


@pytest.fixture(scope="module")
def mics(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mics")
    write_session(folder, 3, PARAMS, seed=5)
    return folder


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# item 6: an output folder that cannot be created or written


@needs_model
def test_output_folder_that_is_a_file_is_one_line_and_exit_2(mics, tmp_path, caplog):
    blocker = tmp_path / "picks"
    blocker.write_text("not a folder")
    assert cli.main([str(mics / "mic_00000.mrc"), "--diameter-px", "24", "-o", str(blocker)]) == cli.EXIT_FAILED
    assert cli.main([str(mics / "mic_00000.mrc"), "--diameter-px", "24", "-o", str(blocker / "sub")]) == cli.EXIT_FAILED
    errors = _error_lines(caplog)
    assert len(errors) == 2 and all("\n" not in e and str(blocker) in e for e in errors)
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot use the output folder"):
            OutputFolder.open(folder)
    finally:
        folder.chmod(0o700)


@needs_model
def test_full_disk_mid_run_stops_with_the_index_of_what_was_written(mics, tmp_path, monkeypatch, caplog):
    out = tmp_path / "picks"
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):  # the disk fills up while the second micrograph's files are written
        if "mic_00001" in os.fspath(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli.main([str(mics), "--diameter-px", "24", "-o", str(out), "--format", "star", "box"]) == cli.EXIT_FAILED
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert [os.path.basename(n) for n in index["rlnMicrographName"]] == ["mic_00000.mrc"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("mic_")) == ["mic_00000.box", "mic_00000_autopick.star", "mic_00000_emmae.npz"]
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert len(particles) == len(read_centres(out / "mic_00000_autopick.star"))
    assert any("No space left on device" in e and "stopping" in e for e in _error_lines(caplog))


# item 7: micrographs STAR rows that do not resolve


def _micrographs_star(path, names):
    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": names})}, path)


def test_star_whose_rows_do_not_resolve_names_the_root_and_the_option(mics, tmp_path, monkeypatch, caplog):
    star = tmp_path / "corrected_micrographs.star"
    _micrographs_star(star, ["MotionCorr/job002/mic_00000.mrc", "MotionCorr/job002/mic_00001.mrc"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main([str(star), "--diameter-px", "24", "-o", str(tmp_path / "out")]) == cli.EXIT_FAILED
    (message,) = _error_lines(caplog)
    assert str(elsewhere.resolve()) in message and "--project-root" in message and "MotionCorr/job002/mic_00000.mrc" in message
    assert not (tmp_path / "out").exists()


@needs_model
def test_one_missing_star_micrograph_is_reported_and_skipped(mics, tmp_path, caplog):
    project = tmp_path / "project"
    (project / "MotionCorr" / "job002").mkdir(parents=True)
    (project / "MotionCorr" / "job002" / "mic_00000.mrc").write_bytes((mics / "mic_00000.mrc").read_bytes())
    star = project / "corrected_micrographs.star"
    _micrographs_star(star, ["MotionCorr/job002/mic_00000.mrc", "MotionCorr/job002/gone.mrc"])
    out = tmp_path / "out"
    assert cli.main([str(star), "--project-root", str(project), "--diameter-px", "24", "-o", str(out)]) == cli.EXIT_PARTIAL
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert index["rlnMicrographName"].tolist() == ["MotionCorr/job002/mic_00000.mrc"]
    assert (out / "mic_00000_autopick.star").is_file()  # where RELION looks: the STAR name without its job folder
    failed = (out / FAILED_FILE).read_text().splitlines()
    assert failed == ["# micrograph\tkind\treason", f"{project / 'MotionCorr' / 'job002' / 'gone.mrc'}\tmicrograph\tno such file"]
    assert any("gone.mrc" in e for e in _error_lines(caplog))


# items 8, 10, 13: re-thresholding keeps the run's output options; pixel size and diameter logged; CBOX 1.0


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory):
    """One micrograph with a 1.0 A header (a placeholder), picked with flipped, scaled coordinates in every format."""
    folder = tmp_path_factory.mktemp("placeholder")
    write_session(folder, 1, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=1.0), seed=6)
    out = tmp_path_factory.mktemp("flipped") / "picks"
    argv = [str(folder), "--diameter-A", "24", "-o", str(out), "--flip-y", "--scale", "2", "--format", "star", "box", "cbox", "--preview"]
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        code = cli.main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    return code, out, argv, handler.records


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@needs_model
def test_placeholder_pixel_size_is_warned_and_the_resolved_sizes_are_logged(flipped_run):
    code, _, _, records = flipped_run
    assert code == cli.EXIT_OK
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("exactly 1.0 A" in w and "--pixel-size-A" in w for w in warnings)
    assert any("pixel 1 A, diameter 24.0 px" in r.getMessage() for r in records if r.levelno == logging.INFO)


@needs_model
def test_cbox_is_complete_and_inside_the_micrograph(flipped_run):
    _, out, _, _ = flipped_run
    blocks = starfile.read(out / "mic_00000.cbox", always_dict=True)
    assert set(blocks) == {"global", "cryolo", "cryolo_include"}
    boxes = blocks["cryolo"]
    assert len(boxes) > 0
    corner = boxes[["CoordinateX", "CoordinateY"]].to_numpy()
    size = boxes[["Width", "Height"]].to_numpy()
    assert np.all(corner >= 0) and np.all(corner + size <= 256 * 2)  # written coordinates are scaled by 2
    np.testing.assert_allclose(boxes["EstWidth"], 24.0 * 2)  # the particle, not the box
    np.testing.assert_allclose(boxes["Width"], 24.0 * 2 * 1.5)
    saved = repick(load_picks(out / "mic_00000_emmae.npz"), validate_config({"preprocess": {"diameter_A": 24.0}}))
    assert len(boxes) <= len(saved.candidates_score)


@needs_model
def test_rethreshold_keeps_the_runs_output_options_and_removes_what_it_supersedes(flipped_run, tmp_path):
    code, out, argv, _ = flipped_run
    assert code == cli.EXIT_OK and (out / "mic_00000.box").is_file() and (out / "mic_00000_preview.png").is_file()
    preview_before = (out / "mic_00000_preview.png").stat().st_mtime_ns
    again = ["--rethreshold", str(out), "--set", "postprocess.keep_fraction=0.5", "--format", "star"]
    assert cli.main(again) == cli.EXIT_OK
    recorded = validate_config(json.loads((out / "emmae-config.json").read_text())["config"])
    assert recorded.output.flip_y and recorded.output.coordinate_scale == 2 and recorded.postprocess.keep_fraction == 0.5
    # the picks are the saved map re-picked under the new cut, written flipped and scaled as the run asked
    expected = repick(load_picks(out / "mic_00000_emmae.npz"), recorded)
    np.testing.assert_allclose(read_centres(out / "mic_00000_autopick.star"), transform_xy(expected.xy, expected.shape, recorded.output), atol=0.01)
    assert expected.shape == (256, 256) and len(expected) > 0
    assert not (out / "mic_00000.box").exists() and not (out / "mic_00000.cbox").exists()  # formats no longer asked for
    assert (out / "mic_00000_preview.png").stat().st_mtime_ns > preview_before  # redrawn from the recorded micrograph
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(particles[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), read_centres(out / "mic_00000_autopick.star"))
    record = json.loads((out / "emmae-config.json").read_text())
    assert record["argv"] == argv and record["rethreshold_argv"] == [again]


@needs_model
def test_rethreshold_min_distance_in_angstrom(flipped_run):
    _, out, _, _ = flipped_run
    assert cli.main(["--rethreshold", str(out), "--min-distance-A", "48", "--set", "postprocess.keep_fraction=1.0"]) == cli.EXIT_OK
    record = json.loads((out / "emmae-config.json").read_text())
    assert record["config"]["postprocess"]["min_distance_diameters"] == pytest.approx(48 / 24)
    xy = read_centres(out / "mic_00000_autopick.star") / 2  # undo --scale 2 (a flip keeps distances)
    if len(xy) > 1:
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
        assert d.min() >= 48 - 0.01  # 1.0 A pixels


def test_min_distance_needs_a_diameter_in_angstrom():
    config = validate_config({"preprocess": {"diameter_px": 20.0}})
    with pytest.raises(cli.ConfigError, match="--min-distance-A needs"):
        cli.with_min_distance(config, 100.0)
    given = validate_config({"preprocess": {"diameter_px": 20.0, "pixel_size_A": 2.0}})
    assert cli.with_min_distance(given, 100.0).postprocess.min_distance_diameters == pytest.approx(100 / 40)


# item 14: folders


def test_folder_inputs_any_case_recursive_and_mirrored(tmp_path):
    for sub in ("GridSquare_1", "GridSquare_2"):
        (tmp_path / "mics" / sub).mkdir(parents=True)
    (tmp_path / "mics" / "top.MRC").write_bytes(b"")
    (tmp_path / "mics" / ".top.mrc").write_bytes(b"")  # hidden (e.g. macOS ._ files): never a micrograph
    (tmp_path / "mics" / "GridSquare_1" / "a.mrc").write_bytes(b"")
    (tmp_path / "mics" / "GridSquare_2" / "a.Mrc").write_bytes(b"")
    config = validate_config({})
    flat = cli.collect_inputs([str(tmp_path / "mics")], config)
    assert [i.stem for i in flat] == ["top"]
    deep = cli.collect_inputs([str(tmp_path / "mics")], config, recursive=True)
    assert [i.stem for i in deep] == ["GridSquare_1/a", "GridSquare_2/a", "top"]
    two = cli.collect_inputs([str(tmp_path / "mics" / "GridSquare_1"), str(tmp_path / "mics" / "GridSquare_2")], config)
    assert [i.stem for i in two] == ["GridSquare_1/a", "GridSquare_2/a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--recursive"):
        cli.collect_inputs([str(tmp_path / "empty")], config)


@needs_model
def test_two_folders_with_equal_names_do_not_collide(mics, tmp_path, monkeypatch, caplog):
    """Also: --batch-tiles and --threads reach the encoder, and a pixel size given explicitly is not warned about."""
    from emmae.runtime.picking.encoder import Encoder

    write_session(tmp_path / "one_A", 1, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=1.0), seed=7)
    for sub, source in (("A", tmp_path / "one_A" / "mic_00000.mrc"), ("B", mics / "mic_00001.mrc")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "mic_00000.mrc").write_bytes(source.read_bytes())
    opened: list[Encoder] = []
    runs: list[int] = []
    original_open, original_run = Encoder.open.__func__, Encoder._run_host

    def recording_open(cls, *args, **kwargs):
        opened.append(original_open(cls, *args, **kwargs))
        return opened[-1]

    def counted(self, tiles):
        runs.append(len(tiles))
        return original_run(self, tiles)

    monkeypatch.setattr(Encoder, "open", classmethod(recording_open))
    monkeypatch.setattr(Encoder, "_run_host", counted)
    out = tmp_path / "out"
    argv = [str(tmp_path / "A"), str(tmp_path / "B"), "--diameter-A", "24", "--pixel-size-A", "1.0", "-o", str(out), "--batch-tiles", "100", "--threads", "1"]
    assert cli.main(argv) == cli.EXIT_OK
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*_autopick.star") if p.name != "autopick.star") == [
        "A/mic_00000_autopick.star", "B/mic_00000_autopick.star"]
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert [os.path.basename(os.path.dirname(n)) for n in index["rlnMicrographName"]] == ["A", "B"]
    assert all(os.path.isfile(f) for f in index["rlnMicrographCoordinates"])
    a, b = read_centres(out / "A" / "mic_00000_autopick.star"), read_centres(out / "B" / "mic_00000_autopick.star")
    assert a.shape != b.shape or not np.allclose(a, b)  # two different micrographs, two different pick files
    (encoder,) = opened
    assert encoder.batch_tiles == 100 and encoder.bundle.session.get_session_options().intra_op_num_threads == 1
    assert max(runs) == 100 and len(runs) >= 4  # a 1024-px grid is 256 tiles: three runs of at most 100 per micrograph
    record = json.loads((out / "emmae-config.json").read_text())
    assert record["config"]["model"]["batch_tiles"] == 100
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # 1.0 A given explicitly: no placeholder warning
