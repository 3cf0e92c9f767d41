"""A stream that survives what a facility does to it: poison micrographs, rewritten STARs, moved sessions, early stops.

One test (or two) per item of the reliability audit, numbered as in docs/streaming.md's
reliability table: a poison micrograph stays failed (1), a rewritten upstream STAR is
"not ready yet" (2), a moved or copied session keeps its index (3), a stop during start-up
is a stop (4), a restart after a re-threshold keeps one cut (5), a failed file deleted is
forgotten (6), tiny files are refused at once and old files are not waited for (7), and the
smaller ones (8): a micrograph deleted while picked, ``.mrcs`` stacks, ``--demo --adapt``,
crYOLO's ``--gpu 0``, the web view's Host header. In-process sessions without a model where
a scan is the point; the command where picks or the exit status are.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from emmae.config import load_config
from emmae.errors import EmmaeError, MicrographError
from emmae.io.mrc import write_micrograph
from emmae.runtime.commands import pick as cli
from emmae.runtime.commands import demo as demo_cmd
from emmae.runtime.commands import stream as stream_cmd
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.stream import gate as gate_module
from emmae.runtime.stream.daemon import IN_HAND_FILE, Daemon, StopFlag
from emmae.runtime.stream.gate import Gate
from emmae.runtime.stream.journal import Journal
from emmae.synth import SynthParams, write_session
from tests.test_stream_hardening import micrograph, ready, session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)
FAST = ["--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.05", "--poll", "--progress", "plain", "--threads", "1"]


def stream(watch: Path, out: Path, *extra: str) -> int:
    return stream_cmd.main(["--watch", str(watch), "--out", str(out), "--once", *FAST, *extra])


def index_names(out: Path) -> list[str]:
    return list(starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]["rlnMicrographName"])


def star_rows(path: Path) -> int:
    """Rows of a STAR file's loops but its optics block (0 when it has none)."""
    blocks = starfile.read(path, always_dict=True)
    return sum(len(block) for name, block in blocks.items() if hasattr(block, "columns") and name != "optics")


# --- 1. a poison micrograph stays failed --------------------------------------------------------------------


def test_1_a_micrograph_failed_for_killing_the_daemon_is_not_picked_again_unchanged(tmp_path, caplog):
    watch, out = tmp_path / "mics", tmp_path / "out"
    path = micrograph(watch / "poison.mrc", seed=3)
    caplog.set_level(logging.WARNING, logger="emmae.stream")
    for start in range(4):
        out.mkdir(exist_ok=True)
        if start < 3:
            (out / IN_HAND_FILE).write_bytes(os.fsencode(path))  # what the pick stage leaves when the daemon dies on it
        with session(watch, out, "preprocess.diameter_px=24", "stream.max_attempts=3") as live:
            live.scan()
            entry = live.journal.get("poison.mrc")
            if start >= 2:  # failed at the third death, and left alone at that start and the next
                assert entry.state == "failed" and "died while picking it, 3 times" in entry.reason
                assert ready(live) == [], f"start {start + 1}: the failed micrograph was handed on again"
            else:
                assert ready(live) == ["poison.mrc"] and entry.attempts == start + 1
    journal = Journal(out)
    try:
        journal.count_attempt("good.mrc")
        journal.count_attempt("good.mrc")
        journal.mark_picked("good.mrc", "mics/good.mrc", 3, "good_autopick.star", {}, 10, 10)
        assert journal.get("good.mrc").attempts == 0  # a clean pick resets the count
    finally:
        journal.close()


def test_1_a_death_while_the_session_is_fitted_does_not_count_against_the_micrograph(tmp_path, monkeypatch):
    from emmae.runtime import jobs
    from emmae.runtime.stream.pipeline import InHand

    marker, seen = InHand(tmp_path / IN_HAND_FILE, tmp_path), []
    monkeypatch.setattr(jobs, "encode", lambda prepared, encoder: seen.append(("encode", marker.path.exists())) or "encoded")
    monkeypatch.setattr(jobs, "pick", lambda encoded, config, encoder, session: seen.append(("pick", marker.path.exists())) or "picks")

    class Fitting(jobs.Picker):
        def session_for(self, encoded):  # fits the session on every sample so far (seconds, at 1, 2, 4 and 8 samples)
            seen.append(("fit", marker.path.exists()))
            return None, None

    picker = Fitting(load_config(), None, holding=marker.holding)  # type: ignore[arg-type]
    assert jobs.pick_read(jobs.Job(tmp_path / "a.mrc", "a.mrc", "a"), None, picker) == ("picks", None)  # type: ignore[arg-type]
    assert seen == [("encode", True), ("fit", False), ("pick", True)] and not marker.path.exists()


# --- 2. an upstream STAR rewritten under the daemon ----------------------------------------------------------


def _star(path: Path, names: list[str]) -> None:
    starfile.write({"optics": pd.DataFrame({"rlnOpticsGroup": [1]}), "micrographs": pd.DataFrame({"rlnMicrographName": names})}, path,
                   overwrite=True)


def test_2_a_watch_star_rewritten_or_emptied_keeps_its_last_good_list(tmp_path, caplog):
    project, out = tmp_path / "project", tmp_path / "out"
    micrograph(project / "mics" / "a.mrc", seed=1)
    micrograph(project / "mics" / "b.mrc", seed=2)
    star = project / "cm.star"
    _star(star, ["mics/a.mrc"])
    config = load_config(None, ["stream.settle_s=0", "stream.poll=\"always\"", "preprocess.diameter_px=24",
                                f"output.project_root=\"{project}\""])
    caplog.set_level(logging.INFO, logger="emmae.stream")
    live = Daemon(project, out, config, encoder=None, watch_star=star)  # type: ignore[arg-type]
    try:
        live.scan()
        assert ready(live) == ["a.mrc"]
        for text in ("data_optics\n", "data_x\n", "", "data_optics\nloop_\n_rlnOpticsGroup #1\n1\ndata_micr"):
            star.write_text(text)  # RELION rewrites in place: caught empty, half-written, or before its loop
            live.scan()
        said = [r.getMessage() for r in caplog.records if "cm.star" in r.getMessage() and "last" in r.getMessage()]
        assert len(said) == 1, said  # said once
        _star(star, ["mics/a.mrc", "mics/b.mrc"])
        live.scan()
        assert ready(live) == ["a.mrc", "b.mrc"]
    finally:
        live.schedule.ready.clear()
        live.close(StopFlag("test"))
        live.release()


@needs_model
@pytest.mark.parametrize("text", ["data_optics\n", "", "data_optics\nloop_\n_rlnOpticsGroup #1\n1\ndata_micr"])
def test_2_a_watch_star_caught_half_written_at_the_start_is_waited_for(tmp_path, caplog, text):
    star = tmp_path / "cm.star"
    star.write_text(text)
    caplog.set_level(logging.INFO)
    assert stream_cmd.main(["--watch-star", str(star), "--out", str(tmp_path / "out"), "--once", *FAST]) == 0
    assert "cannot be read" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("text", ["data_x\n", "data_optics\n", "# nothing\n"])
def test_2_emmae_pick_on_a_star_without_micrographs_is_one_line(tmp_path, caplog, text):
    star = tmp_path / "x.star"
    star.write_text(text)
    caplog.set_level(logging.ERROR)
    assert cli.main([str(star), "--diameter-px", "24", "--out", str(tmp_path / "out")]) == cli.EXIT_FAILED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "x.star" in errors[0] and "_rlnMicrographName" in errors[0]


# --- 3. a session moved or copied keeps its index -------------------------------------------------------------


@needs_model
def test_3_a_moved_session_keeps_its_index_and_a_copy_does_not_point_back(tmp_path):
    first = tmp_path / "p1"
    mics = write_session(first / "mics", 2, PARAMS, seed=41)
    assert stream(first / "mics", first / "out") == 0
    moved = tmp_path / "p2"
    os.rename(first, moved)
    assert stream(moved / "mics", moved / "out") == 0
    names = sorted(f"mics/{m.name}" for m in mics)
    assert sorted(index_names(moved / "out")) == names
    journal = Journal(moved / "out")
    try:
        picked = journal.picked()
    finally:
        journal.close()
    assert len(picked) == 2 and not any(os.path.isabs(e.outputs) for e in picked)
    assert star_rows(moved / "out" / "particles.star") == sum(e.particles for e in picked) > 0
    assert star_rows(moved / "out" / "micrographs.star") == 2
    copy = tmp_path / "p3"
    shutil.copytree(moved, copy, symlinks=True, copy_function=shutil.copy2)  # cp -a
    shutil.rmtree(moved)  # the old storage is gone: nothing may point back at it
    assert cli.main(["--rethreshold", str(copy / "out"), "--threshold", "0.9", "-q"]) == cli.EXIT_OK
    index = starfile.read(copy / "out" / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == names  # not doubled
    assert not any(os.path.isabs(c) for c in index["rlnMicrographCoordinates"])


# --- 4. a stop during start-up ------------------------------------------------------------------------------------


@needs_model
def test_4_a_stop_file_created_during_start_up_is_a_stop(tmp_path, monkeypatch, caplog):
    watch, out = tmp_path / "mics", tmp_path / "out"
    write_session(watch, 1, PARAMS, seed=42)
    real = stream_cmd.Encoder.configured

    def loading(*args, **kwargs):  # the stop file appears while the model loads
        (watch / "EMMAE_STOP").touch()
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_cmd.Encoder, "configured", loading)
    caplog.set_level(logging.INFO, logger="emmae.stream")
    assert stream(watch, out) == 0
    assert "left from an earlier run" not in caplog.text and "stop file found" in caplog.text
    assert " picked " not in caplog.text and not (watch / "EMMAE_STOP").exists()


SIGTERM_WHILE_LOADING = """
import os, signal, sys
from emmae.runtime.commands import stream
real = stream.Encoder.configured
def loading(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
stream.Encoder.configured = loading
sys.exit(stream.main(sys.argv[1:]))
"""


@needs_model
def test_4_sigterm_during_start_up_is_a_clean_stop(tmp_path):
    watch, out = tmp_path / "mics", tmp_path / "out"
    write_session(watch, 1, PARAMS, seed=43)
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_LOADING, "--watch", str(watch), "--out", str(out), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "SIGTERM received" in done.stderr and " picked " not in done.stderr and "Traceback" not in done.stderr


# --- 5. one cut per session --------------------------------------------------------------------------------------


@needs_model
def test_5_a_restart_after_a_rethreshold_continues_with_its_cut_or_refuses_in_one_line(tmp_path, caplog):
    watch, out = tmp_path / "mics", tmp_path / "out"
    mics = write_session(watch, 3, PARAMS, seed=44)
    os.rename(mics[2], tmp_path / mics[2].name)
    assert stream(watch, out) == 0
    assert cli.main(["--rethreshold", str(out), "--threshold", "0.95", "--format", "star", "box", "-q"]) == cli.EXIT_OK
    os.rename(tmp_path / mics[2].name, mics[2])  # lands after the re-threshold
    caplog.set_level(logging.INFO)
    assert stream(watch, out) == 0  # no cut given: the folder's
    record = OutputFolder(out).read_record()
    assert record["config"]["postprocess"]["threshold"] == 0.95 and record["config"]["output"]["formats"] == ["star", "box"]
    assert sorted(p.name for p in out.rglob("*.box")) == sorted(f"{m.stem}.box" for m in mics)
    journal = Journal(out)
    try:
        counts = {e.path: e.particles for e in journal.picked()}
    finally:
        journal.close()
    assert counts == {m.name: star_rows(out / "mics" / f"{m.stem}_autopick.star") for m in mics}
    caplog.clear()
    assert stream(watch, out, "--threshold", "0.5") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--rethreshold" in errors[0] and "0.95" in errors[0]


# --- 6. a failed file deleted is forgotten -----------------------------------------------------------------------


def test_6_a_failed_file_that_is_deleted_is_forgotten(tmp_path):
    watch, out = tmp_path / "mics", tmp_path / "out"
    watch.mkdir()
    (watch / "junk.mrc").write_bytes(b"not an MRC file " * 100)
    (watch / "gone.mrc").write_bytes(b"not an MRC file either " * 100)
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        assert sorted(e.path for e in live.journal.failed()) == ["gone.mrc", "junk.mrc"]
        (watch / "junk.mrc").unlink()
        live.scanner._sweep_at = -float("inf")  # the next scan looks at every known file
        live.scan()
        assert [e.path for e in live.journal.failed()] == ["gone.mrc"] and live.progress.failed == 1
    (watch / "gone.mrc").unlink()
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        live.recorder.report_failed()
        assert live.journal.failed() == [] and live.progress.failed == 0
    assert not (out / "failed.txt").exists()


# --- 7. tiny and old files are not held ----------------------------------------------------------------------------


def test_7_tiny_micrographs_are_refused_from_their_header_at_once(tmp_path):
    watch, out = tmp_path / "mics", tmp_path / "out"
    watch.mkdir()
    for i in range(5):
        write_micrograph(watch / f"tiny_{i}.mrc", np.zeros((2, 2), np.float32), 4.0)  # its data block ends in zeros
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        reasons = {e.path: e.reason for e in live.journal.failed()}
        assert len(reasons) == 5 and all("too small" in r for r in reasons.values()), reasons
        assert live.admission.pending == 0


def test_7_a_file_untouched_for_long_is_not_waited_for_again(tmp_path, monkeypatch):
    good = micrograph(tmp_path / "good.mrc").read_bytes()
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(good[: len(good) // 2])
    zeros = tmp_path / "zeros.mrc"
    zeros.write_bytes(good[: len(good) - 8192] + bytes(8192))
    later = time.time() + 600
    monkeypatch.setattr(gate_module.time, "time", lambda: later)  # both files last changed 10 minutes ago
    gate = Gate(settle_s=1.0, stale_after_s=180.0)
    assert gate.check(cut, now=0.0) == "waiting" and gate.check(zeros, now=0.0) == "waiting"  # settling: watched for 1 s
    with pytest.raises(MicrographError, match="incomplete and unchanged"):
        gate.check(cut, now=1.5)
    assert gate.check(zeros, now=1.5) == "ready"


# --- 8. the smaller ones ----------------------------------------------------------------------------------------------


@needs_model
def test_8_a_micrograph_deleted_while_it_is_picked_is_not_listed(tmp_path, monkeypatch, caplog):
    from emmae.runtime.stream import pipeline

    watch, out = tmp_path / "mics", tmp_path / "out"
    mics = write_session(watch, 2, PARAMS, seed=45)
    real = pipeline.pick_read

    def deleting(job, prepared, picker):
        if job.path.name == mics[1].name:
            os.unlink(job.path)  # deleted while in hand
        return real(job, prepared, picker)

    monkeypatch.setattr(pipeline, "pick_read", deleting)
    caplog.set_level(logging.INFO, logger="emmae.stream")
    assert stream(watch, out) == 0
    assert index_names(out) == [f"mics/{mics[0].name}"]
    assert [r for r in caplog.records if r.levelno == logging.WARNING and mics[1].name in r.getMessage() and "deleted" in r.getMessage()]
    assert not list(out.rglob(f"{mics[1].stem}*"))


def test_8_mrcs_stacks_are_named_once_as_not_picked(tmp_path, caplog):
    watch, out = tmp_path / "mics", tmp_path / "out"
    watch.mkdir()
    for name in ("movie_1.mrcs", "movie_2.MRCS"):
        (watch / name).write_bytes(b"\0" * 2048)
    caplog.set_level(logging.INFO, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        live.scanner._sweep_at = -float("inf")
        live.scan()
    said = [r.getMessage() for r in caplog.records if ".mrcs" in r.getMessage()]
    assert len(said) == 1 and "movie_1.mrcs" in said[0] and "2" in said[0], said


def test_8_demo_keeps_the_options_it_is_given(monkeypatch):
    seen = {}

    def daemon(watch, out, config, *args, **kwargs):
        seen["config"] = config
        raise EmmaeError("stop here")

    monkeypatch.setattr(sys, "argv", ["emmae-stream", "--demo", "--demo-count", "1", "--adapt", "3", "-t", "0.7"])
    monkeypatch.setattr(demo_cmd.Encoder, "configured", lambda *a, **k: None)
    monkeypatch.setattr(demo_cmd, "Daemon", daemon)
    monkeypatch.setattr(demo_cmd.Acquisition, "start", lambda self: None)
    assert stream_cmd.main() == stream_cmd.EXIT_USAGE
    assert seen["config"].stream.adapt_after == 3 and seen["config"].postprocess.threshold == 0.7


def test_8_gpu_takes_a_device_number_as_cryolo_does():
    from emmae.commandline import choose_gpu

    args = cli.build_parser().parse_args(["m.mrc", "--gpu", "0", "--diameter-px", "24"])
    assert args.inputs == ["m.mrc"] and cli._config(args).backend.device == "gpu"
    environ: dict[str, str] = {}
    choose_gpu(args, environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "0"}
    args = cli.build_parser().parse_args(["-g", "1", "m.mrc", "--diameter-px", "24"])
    environ = {"CUDA_VISIBLE_DEVICES": "4,5"}  # a scheduler's choice: -g counts within it
    choose_gpu(args, environ)
    assert args.inputs == ["m.mrc"] and environ["CUDA_VISIBLE_DEVICES"] == "5"
    args = cli.build_parser().parse_args(["-g", "m.mrc", "--diameter-px", "24"])  # no number: any GPU
    assert args.inputs == ["m.mrc"] and cli._config(args).backend.device == "gpu"
    assert stream_cmd._config(stream_cmd.build_parser().parse_args(["--gpu", "0"])).backend.device == "gpu"


def test_8_gpu_with_several_numbers_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["m.mrc", "-g", "0", "1", "--diameter-px", "24"])
    assert stop.value.code == 2 and "one GPU" in capsys.readouterr().err


def test_8_the_web_view_on_loopback_answers_only_requests_addressed_to_it(tmp_path):
    import http.client

    from emmae.runtime.web.folder import FolderView
    from emmae.runtime.web.server import serve

    out = tmp_path / "emmae_picks"
    out.mkdir()
    (out / "failed.txt").write_text("# micrograph\tkind\treason\n")
    running = serve(FolderView(out), "127.0.0.1:0")

    def status_for(host: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        try:
            connection.putrequest("GET", "/files/failed.txt", skip_host=True)
            connection.putheader("Host", host)
            connection.endheaders()
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        for host in ("evil.example", f"evil.example:{running.port}", "192.0.2.7", f"127.0.0.1.evil.example:{running.port}"):
            assert status_for(host) == 403, host  # a page elsewhere that rebinds its name to 127.0.0.1
        for host in (f"127.0.0.1:{running.port}", f"localhost:{running.port}", "localhost", f"[::1]:{running.port}"):
            assert status_for(host) == 200, host
    finally:
        running.stop()
