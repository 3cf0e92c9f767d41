"""A stream's state survives restarts and moves; every exit says what happened in one line.

Each test names the item of the stream-state work it checks (numbers as in docs/streaming.md's
"Streaming" section): restarts carry the same session (1), a moved or copied session is not
picked again while a rewrite is (2), names relative to the project root through one spelling
(3), the index lists micrographs due to be picked again (4), a re-threshold respects a
running daemon and keeps micrographs without a saved map listed (5), a micrograph that kills
the daemon is failed after a few attempts (6), ``--once`` exit codes and a line while it
waits (8), ``--watch-star`` checked at the start (9), a header too large for memory (10), a
diameter too small and a checkpoint that is not one (11), one admission rule (12), counts
that never go negative (13), ``.box`` rows inside the micrograph (14), and the flags of
other pickers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from emmae.config import load_config
from emmae.io.mrc import HEADER_BYTES, write_micrograph
from emmae.io.picks import write_box
from emmae.runtime.commands import pick as cli
from emmae.runtime.commands import stream as stream_cmd
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.stream import recorder as recorder_module
from emmae.runtime.stream.daemon import IN_HAND_FILE, Daemon, StopFlag
from emmae.runtime.stream.journal import Journal
from emmae.runtime.stream.status import Progress
from emmae.synth import SynthParams, make_micrograph, write_session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)
FAST = ["--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.05", "--poll", "--progress", "plain", "--threads", "1"]


def stream(watch: Path, out: Path, *extra: str) -> int:
    return stream_cmd.main(["--watch", str(watch), "--out", str(out), "--once", *FAST, *extra])


def command(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def picked_sessions(out: Path) -> set[str]:
    """The session id each picked micrograph's saved picks were made with."""
    journal = Journal(out)
    try:
        saved = [np.load(out / e.outputs.replace("_autopick.star", "_emmae.npz")) for e in journal.picked()]
    finally:
        journal.close()
    return {json.loads(str(s["meta"]))["session"]["id"] for s in saved}


def stars(out: Path) -> dict[str, np.ndarray]:
    return {p.name: starfile.read(p)[["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]].to_numpy()
            for p in sorted(out.rglob("*_autopick.star"))}


# --- 1. a restart carries on the same session ---------------------------------------------------------


@needs_model
def test_a_restart_before_the_session_is_fixed_carries_on_its_samples(tmp_path):
    mics = write_session(tmp_path / "all", 4, PARAMS, seed=31)
    whole, split = tmp_path / "whole" / "mics", tmp_path / "split" / "mics"
    for folder in (whole, split):
        folder.mkdir(parents=True)
        for m in mics:
            shutil.copy2(m, folder / m.name)
    fixed = ["--set", "cluster.session_micrographs=4"]
    assert stream(whole, tmp_path / "whole" / "out", *fixed) == 0  # uninterrupted
    for m in mics[2:]:
        os.rename(split / m.name, tmp_path / m.name)  # the last two land after a restart
    assert stream(split, tmp_path / "split" / "out", *fixed) == 0
    assert not (tmp_path / "split" / "out" / "emmae-session.json").exists()  # 2 of 4 samples: not fixed yet
    for m in mics[2:]:
        os.rename(tmp_path / m.name, split / m.name)
    assert stream(split, tmp_path / "split" / "out", *fixed) == 0
    ids = [json.loads((tmp_path / run / "out" / "emmae-session.json").read_text())["summary"]["id"] for run in ("whole", "split")]
    assert ids[0] == ids[1]  # the same four samples, the same session
    assert set(picked_sessions(tmp_path / "split" / "out")) == {ids[0]}  # the first two were picked again with it
    a, b = stars(tmp_path / "whole" / "out"), stars(tmp_path / "split" / "out")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)


# --- 2. identity is the content, not the inode ---------------------------------------------------------


@needs_model
def test_a_copied_session_is_not_picked_again_but_a_rewrite_is(tmp_path, caplog):
    watch, out = tmp_path / "a" / "mics", tmp_path / "out"
    mics = write_session(watch, 2, PARAMS, seed=32)
    assert stream(watch, out) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*_autopick.star")}
    assert len(before) == 2
    moved = tmp_path / "b" / "mics"
    shutil.copytree(watch, moved, copy_function=shutil.copy2)  # cp -a: other inodes, same sizes and mtimes
    caplog.set_level(logging.INFO, logger="emmae.stream")
    assert stream(moved, out) == 0
    assert not [r for r in caplog.records if "changed since it was picked" in r.getMessage()]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_autopick.star")} == before  # nothing picked again
    target = moved / mics[0].name
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[HEADER_BYTES:] = bytes(make_micrograph(PARAMS, seed=99).image.astype(np.float32).tobytes())
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # rewritten in place, the mtime put back
    caplog.clear()
    assert stream(moved, out) == 0
    assert [r for r in caplog.records if "changed since it was picked" in r.getMessage() and mics[0].name in r.getMessage()]


# --- 3. names relative to the project root, one spelling -------------------------------------------------


@needs_model
def test_names_are_relative_to_the_project_root_whatever_the_spelling(tmp_path):
    watch = tmp_path / "session" / "Movies"
    write_session(watch, 1, PARAMS, seed=33)
    (tmp_path / "link").symlink_to(tmp_path / "session")
    names = []
    for spelling in (watch, tmp_path / "link" / "Movies", tmp_path / "link" / ".." / "session" / "Movies"):
        out = tmp_path / f"out{len(names)}"
        assert stream(spelling, out) == 0
        names.append(list(starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]["rlnMicrographName"]))
    assert names == [["Movies/mic_00000.mrc"]] * 3
    assert stream(watch, tmp_path / "out-root", "--project-root", str(tmp_path)) == 0
    index = starfile.read(tmp_path / "out-root" / "autopick.star", always_dict=True)["coordinate_files"]
    assert list(index["rlnMicrographName"]) == ["session/Movies/mic_00000.mrc"]


# --- 4. the index lists what is due to be picked again ------------------------------------------------------


def test_micrographs_due_to_be_picked_again_stay_in_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "ROWS_READ_PER_INDEX", 1)  # an earlier run's saved picks read back one per rewrite
    watch, out = tmp_path / "mics", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    journal = Journal(out)
    for i in range(3):
        (out / f"m{i}_autopick.star").write_text("")
        journal.mark_picked(f"m{i}.mrc", f"mics/m{i}.mrc", 1, str(out / f"m{i}_autopick.star"), {}, 10, 10, 1, "model", "provisional")
    journal.close()
    config = load_config(None, ["preprocess.diameter_px=24", "stream.poll=\"always\""])
    live = Daemon(watch, out, config, encoder=None)
    try:
        again = live.recorder.repick_other_sessions("fixed", "model")
        live.write_index()
        assert sorted(again) == ["m0.mrc", "m1.mrc", "m2.mrc"] and live.progress.count == 3
        assert live.recorder.index_stale  # autopick.star lists all three; the other index files wait for their picks
        listed = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
        assert len(listed) == 3
        live.write_index()
        live.write_index()
        assert not live.recorder.index_stale
    finally:
        live.close(StopFlag("test"))
        live.release()
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == ["mics/m0.mrc", "mics/m1.mrc", "mics/m2.mrc"]


# --- 5. a re-threshold and a running daemon ---------------------------------------------------------------------


@needs_model
def test_a_rethreshold_waits_for_a_running_daemon_and_keeps_unsaved_micrographs_listed(tmp_path):
    mics = write_session(tmp_path / "mics", 2, PARAMS, seed=34)
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "mics"), "--diameter-px", "24", "--out", str(out), "-q"]) == cli.EXIT_OK
    with OutputFolder.open(out):  # as a running daemon holds it
        refused = command("emmae.runtime.commands.pick", "--rethreshold", str(out), "--threshold", "0.9")
    assert refused.returncode == 2 and "another emmae command is writing to" in refused.stderr and "Traceback" not in refused.stderr
    (out / f"{mics[0].stem}_emmae.npz").unlink()
    assert cli.main(["--rethreshold", str(out), "--threshold", "0.9", "-q"]) == cli.EXIT_OK
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(str(m) for m in mics)


# --- 6. a micrograph that kills the daemon ---------------------------------------------------------------------


def test_a_micrograph_in_hand_at_every_crash_is_failed_after_a_few_attempts(tmp_path, caplog):
    watch, out = tmp_path / "mics", tmp_path / "out"
    path = write_session(watch, 1, PARAMS, seed=35)[0]
    config = load_config(None, ["preprocess.diameter_px=24", "stream.poll=\"always\"", "stream.max_attempts=3"])
    caplog.set_level(logging.WARNING, logger="emmae.stream")
    for _ in range(3):
        out.mkdir(exist_ok=True)
        (out / IN_HAND_FILE).write_bytes(os.fsencode(path))  # what the pick stage leaves when the process is killed
        live = Daemon(watch, out, config, encoder=None)
        failed = live.journal.failed()
        live.close(StopFlag("test"))
        live.release()
    assert [e.path for e in failed] == ["mic_00000.mrc"] and "died while picking it, 3 times" in failed[0].reason
    assert not (out / IN_HAND_FILE).exists()


# --- 8, 9. exit codes and lines of --once and --watch-star ------------------------------------------------------


@needs_model
def test_once_with_a_truncated_file_says_so_and_exits_3(tmp_path):
    watch = tmp_path / "mics"
    write_session(watch, 1, PARAMS, seed=36)
    (watch / "tiny.mrc").write_bytes(b"\0" * 100)
    result = command("emmae.runtime.commands.stream", "--watch", str(watch), "--once", *FAST, "--stale-after-s", "1")
    assert result.returncode == 3, result.stderr
    assert "tiny.mrc: still being written" in result.stderr and "Traceback" not in result.stderr


def test_watch_star_missing_or_without_names_exits_2_naming_it(tmp_path):
    missing = command("emmae.runtime.commands.stream", "--watch-star", str(tmp_path / "none.star"), "--diameter-px", "24", "--once")
    assert missing.returncode == 2 and "none.star: no such file" in missing.stderr and "Traceback" not in missing.stderr
    wrong = tmp_path / "wrong.star"
    starfile.write({"micrographs": pd.DataFrame({"rlnImageName": ["a.mrc"]})}, wrong)
    result = command("emmae.runtime.commands.stream", "--watch-star", str(wrong), "--diameter-px", "24", "--once")
    assert result.returncode == 2 and "_rlnMicrographName" in result.stderr and "wrong.star" in result.stderr


# --- 10, 11, 12. one line, no traceback ------------------------------------------------------------------------------


def _header_only(path: Path, nx: int, ny: int) -> Path:
    """A sparse MRC whose header claims nx x ny float32 pixels."""
    write_micrograph(path, np.zeros((8, 8), np.float32), 1.0)
    head = bytearray(path.read_bytes()[:HEADER_BYTES])
    head[0:8] = np.array([nx, ny], "<i4").tobytes()
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(HEADER_BYTES + nx * ny * 4)
    return path


@needs_model
@pytest.mark.parametrize(("shape", "says"), [((100_000, 100_000), "too large"), ((20_000, 20_000), "too large"),
                                              ((1, 100_000), "absurdly elongated")])
def test_impossible_micrographs_are_refused_from_the_header_in_one_line(tmp_path, shape, says):
    path = _header_only(tmp_path / "huge.mrc", *shape)
    result = command("emmae.runtime.commands.pick", str(path), "--diameter-px", "24", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and says in result.stderr and "huge.mrc" in result.stderr
    assert "Traceback" not in result.stderr


@needs_model
def test_a_diameter_too_small_and_a_checkpoint_that_is_not_one_are_one_line(tmp_path):
    mics = write_session(tmp_path / "mics", 1, SynthParams(shape=(1024, 1024), diameter_px=40.0, pixel_size_A=1.0), seed=37)
    result = command("emmae.runtime.commands.pick", str(mics[0]), "--diameter-px", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "too small" in result.stderr and "Traceback" not in result.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    pytest.importorskip("torch")
    export = command("emmae.export.cli", str(text), "--out", str(tmp_path / "m.onnx"))
    assert export.returncode == 2 and "notes.txt is not" in export.stderr and "Traceback" not in export.stderr


# --- 13, 14 ---------------------------------------------------------------------------------------------------------------


def test_counts_never_go_negative_when_micrographs_are_picked_again():
    progress = Progress(count=7, particles=700)  # what earlier runs picked
    progress.repicked(100, 120, 0.5)
    progress.repicked(100, 80, 0.5)
    assert progress.count == 7 and progress.particles == 700
    assert "7 picked" in progress.summary(0, 0) and "100 particles per micrograph" in progress.summary(0, 0)


def test_box_rows_reach_nowhere_outside_the_micrograph(tmp_path):
    xy = np.array([[5.0, 50.0], [50.0, 5.0], [50.0, 50.0], [95.0, 50.0]])
    write_box(tmp_path / "a.box", xy, 20.0, size_xy=(100.0, 100.0))
    rows = [list(map(int, line.split("\t"))) for line in (tmp_path / "a.box").read_text().splitlines()]
    assert rows == [[40, 40, 20, 20]]
    assert all(x >= 0 and y >= 0 and x + w <= 100 and y + h <= 100 for x, y, w, h in rows)


# --- flags other pickers' users reach for -------------------------------------------------------------------------------


def test_short_flags_and_distances_in_pixels():
    args = cli.build_parser().parse_args(["m.mrc", "-t", "0.7", "-d", "30", "-g", "-j", "2", "--diameter-px", "60"])
    config = cli._config(args)
    assert config.postprocess.threshold == 0.7 and config.backend.device == "gpu" and args.threads == 2
    assert config.postprocess.min_distance_diameters == pytest.approx(0.5)
    angstrom = cli._config(cli.build_parser().parse_args(["m.mrc", "--min-distance-A", "60", "--diameter-px", "60", "--pixel-size-A", "2"]))
    assert angstrom.postprocess.min_distance_diameters == pytest.approx(0.5)
    assert stream_cmd._config(stream_cmd.build_parser().parse_args(["-t", "0.8", "-g"])).postprocess.threshold == 0.8


def test_an_unknown_flag_is_answered_with_the_nearest_known_one(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["m.mrc", "--treshold", "0.7"])
    assert stop.value.code == 2 and "did you mean --threshold?" in capsys.readouterr().err


# --- 7. waiting users -------------------------------------------------------------------------------------------------------


class _Recording:
    """A pipeline that takes every job and remembers the order."""

    in_flight, builder = 0, None

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def has_room(self) -> bool:
        return True

    def submit(self, job) -> bool:
        self.submitted.append(job.path.name)
        return True


def test_micrographs_picked_again_wait_behind_new_ones(tmp_path):
    from emmae.runtime.jobs import Job

    watch, out = tmp_path / "mics", tmp_path / "out"
    watch.mkdir()
    config = load_config(None, ["preprocess.diameter_px=24", "stream.poll=\"always\""])
    live = Daemon(watch, out, config, encoder=None)
    try:
        live.recorder.picked["old.mrc"] = None  # type: ignore[assignment]  # picked before, due again
        live.recorder.repick.add("old.mrc")
        pipeline, live.pipeline = live.pipeline, _Recording()
        live.schedule.again.append(Job(watch / "old.mrc", "mics/old.mrc", "old"))
        live.schedule.ready.extend([Job(watch / "new1.mrc", "mics/new1.mrc", "new1"), Job(watch / "new2.mrc", "mics/new2.mrc", "new2")])
        live.feed()
        assert live.pipeline.submitted == ["new1.mrc", "new2.mrc", "old.mrc"]
        assert live.journal.get("old.mrc") is None  # not marked processing: it stays picked until picked again
    finally:
        live.pipeline = pipeline
        live.close(StopFlag("test"))
        live.release()


@needs_model
def test_a_batch_says_how_far_the_session_sample_is(tmp_path, caplog):
    write_session(tmp_path / "mics", 2, PARAMS, seed=38)
    caplog.set_level(logging.INFO)
    assert cli.main([str(tmp_path / "mics"), "--diameter-px", "24", "--out", str(tmp_path / "out")]) == cli.EXIT_OK
    lines = [r.getMessage() for r in caplog.records]
    assert any("session sample 1 of 2" in line for line in lines) and any("session sample 2 of 2" in line for line in lines)
    assert lines.index(next(line for line in lines if "session sample 1 of 2" in line)) < len(lines) - 3  # before the picks
