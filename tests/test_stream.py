"""The streaming daemon: completeness gate, journal, restart after kill -9, clean stops."""

from __future__ import annotations

import os

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from emmae.errors import NotMRCError
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.stream.gate import Gate
from emmae.runtime.stream.scanner import is_candidate, scan
from emmae.runtime.stream.journal import Journal
from emmae.io.mrc import write_micrograph
from emmae.synth import SynthParams, make_micrograph, write_session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)


def test_candidates_skip_hidden_and_temporary_names(tmp_path):
    for name in ["a.mrc", ".b.mrc", "c.mrc.part", "d.mrc~", "e.tif", "f_downloading.mrc"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.mrc").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.mrc").write_bytes(b"x")
    assert [p.name for p in scan(tmp_path, ("*.mrc",), recursive=True)] == ["a.mrc", "g.mrc"]
    assert [p.name for p in scan(tmp_path, ("*.mrc",), recursive=False)] == ["a.mrc"]
    assert not is_candidate("x.mrc.tmp", ("*.mrc",))


def test_half_written_file_is_never_ready(tmp_path):
    source = tmp_path / "src.mrc"
    write_micrograph(source, make_micrograph(PARAMS, seed=1).image, 4.0)
    payload = source.read_bytes()
    target = tmp_path / "growing.mrc"
    gate = Gate(settle_s=1.0)
    clock = 0.0
    with open(target, "wb") as handle:
        for start in range(0, len(payload), 50_000):
            handle.write(payload[start : start + 50_000])
            handle.flush()
            clock += 5.0  # long pauses between chunks: the size stays put for longer than settle_s
            assert gate.check(target, now=clock) == "waiting"
            if start + 50_000 < len(payload):
                assert gate.check(target, now=clock + 2.0) == "waiting"  # stable but incomplete
    assert gate.check(target, now=clock + 0.5) == "waiting"  # complete, not yet settled
    assert gate.check(target, now=clock + 2.0) == "ready"


def test_corrupt_file_raises_and_vanished_file_is_gone(tmp_path):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"definitely not an MRC file " * 100)
    gate = Gate(settle_s=0.0)
    with pytest.raises(NotMRCError):
        gate.check(bad, now=0.0)
    assert gate.check(tmp_path / "missing.mrc") == "gone"


def test_journal_states_survive_reopening(tmp_path):
    journal = Journal(tmp_path)
    journal.mark_seen("/d/a.mrc", "a.mrc")
    journal.mark_processing("/d/b.mrc", "b.mrc")
    journal.mark_picked("/d/c.mrc", "c.mrc", 12, "out/c_autopick.star", {"encode": 1.0})
    journal.mark_failed("/d/e.mrc", "e.mrc", "truncated", 100, 5)
    journal.close()
    reopened = Journal(tmp_path)  # as after kill -9: 'processing' goes back to 'seen'
    assert reopened.get("/d/b.mrc").state == "seen"
    assert reopened.wants("/d/a.mrc", 1, 1) and reopened.wants("/d/b.mrc", 1, 1)
    assert not reopened.wants("/d/c.mrc", 1, 1)
    assert not reopened.wants("/d/e.mrc", 100, 5)  # failed, unchanged: not retried
    assert reopened.wants("/d/e.mrc", 200, 6)  # changed: retried
    assert [e.name for e in reopened.picked()] == ["c.mrc"]
    assert reopened.counts() == {"seen": 2, "picked": 1, "failed": 1}


def _stream(args: list[str], **kwargs) -> subprocess.Popen:
    code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(process: subprocess.Popen, text: str, timeout_s: float = 60) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()  # not left running (and its pipe open) for a later test to trip over
    process.communicate()
    raise AssertionError(f"{text!r} not seen in:\n{''.join(lines)}")


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".emmae-tmp-")]


@needs_model
def test_kill_9_then_restart_gives_one_set_of_picks(tmp_path):
    watch = tmp_path / "session"
    mics = write_session(watch, 4, PARAMS, seed=3)
    (watch / "broken.mrc").write_bytes(b"not an mrc" * 200)
    out = tmp_path / "out"
    args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.1"]
    first = _stream(args)
    _wait_for(first, "picked mic_00000")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    first.stdout.close()
    second = _stream([*args, "--once"])
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 3, output  # stopped cleanly, one micrograph (broken.mrc) failed
    stars = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_autopick.star") if p.parent != out)
    assert stars == [f"session/{m.stem}_autopick.star" for m in mics]  # where RELION looks: the name below the project root
    journal = Journal(out)
    assert sorted(Path(e.path).name for e in journal.picked()) == [m.name for m in mics]
    failed = journal.get("broken.mrc")  # keyed relative to the watched folder
    assert failed.state == "failed" and "not an MRC file" in failed.reason
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(os.path.relpath(m, m.parent.parent) for m in mics)
    assert _no_temporary_files(out)


@needs_model
def test_sigterm_and_stop_file_stop_cleanly(tmp_path):
    watch = tmp_path / "session"
    write_session(watch, 2, PARAMS, seed=4)
    out = tmp_path / "out"
    args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.1"]
    daemon = _stream(args)
    _wait_for(daemon, "picked mic_00000")
    daemon.send_signal(signal.SIGTERM)
    output, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, output
    assert "SIGTERM received" in output and _no_temporary_files(out)
    starfile.read(out / "autopick.star")  # the index parses
    (watch / "EMMAE_STOP").touch()  # left over: reported and ignored at the next start
    a_minute_ago = time.time() - 60  # older than the next start by more than the slack a coarse file system needs
    os.utime(watch / "EMMAE_STOP", (a_minute_ago, a_minute_ago))
    again = _stream(args)
    _wait_for(again, "left from an earlier run")
    (watch / "EMMAE_STOP").touch()  # touched again while it runs: obeyed
    output, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and "stop file found" in output
    assert not (watch / "EMMAE_STOP").exists()  # removed once obeyed: nothing left for the next start


@needs_model
def test_once_picks_the_backlog_and_exits(tmp_path):
    watch = tmp_path / "session"
    mics = write_session(watch, 2, PARAMS, seed=5)
    out = tmp_path / "out"
    args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0.2", "--poll-interval-s", "0.1", "--once", "--preview", "--progress", "live"]
    daemon = _stream(args)
    output, _ = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, output
    assert len(list(out.glob("session/*_autopick.star"))) == len(mics)
    assert len(list(out.glob("session/*_preview.png"))) == len(mics)
    assert "2 picked, 0 failed" in output and "particles per micrograph" in output
    assert "\x1b[K" in output  # the live status line is redrawn in place (text mode reads its \r as a newline)
    picked = starfile.read(out / "session" / "mic_00000_autopick.star")
    assert np.all(picked["rlnCoordinateX"].between(0, 256))


@needs_model
def test_demo_simulates_and_picks_a_session(tmp_path):
    out = tmp_path / "demo-picks"
    daemon = _stream(["--demo", "--demo-count", "2", "--demo-per-hour", "36000", "--out", str(out)])
    output, _ = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, output
    assert "demo done: 2 micrographs picked" in output
    assert len(list(out.glob("*/demo_*_autopick.star"))) == 2
    starfile.read(out / "autopick.star")


@needs_model
def test_watch_star_follows_upstream_rows_verbatim(tmp_path):
    project = tmp_path / "project"
    movies = project / "MotionCorr" / "job002" / "Movies"
    mics = write_session(movies, 2, PARAMS, seed=6)
    star = project / "MotionCorr" / "job002" / "corrected_micrographs.star"
    names = [f"MotionCorr/job002/Movies/{m.name}" for m in mics]
    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": names})}, star)
    out = tmp_path / "out"
    daemon = _stream(["--watch-star", str(star), "--out", str(out), "--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.1", "--once", "--set", f"output.project_root={str(project)!r}"])
    output, _ = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, output
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(names)


MOUNTS = """sysfs /sys sysfs rw 0 0
/dev/vda / ext4 rw 0 0
server:/export /data nfs4 rw 0 0
//nas/share /mnt/smb cifs rw 0 0
/dev/vdb /data/local ext4 rw 0 0
"""


def test_network_file_systems_are_polled_only():
    from emmae.runtime.stream.watcher import filesystem_type, wants_observer

    assert filesystem_type(Path("/data/session/x"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/data/local/x"), MOUNTS) == "ext4"  # the longest mount point wins
    assert filesystem_type(Path("/mnt/smb"), MOUNTS) == "cifs"
    assert not wants_observer(Path("/data/session"), "auto", MOUNTS)
    assert not wants_observer(Path("/mnt/smb/a"), "auto", MOUNTS)
    assert wants_observer(Path("/home/user"), "auto", MOUNTS)
    assert not wants_observer(Path("/home/user"), "always", MOUNTS)


def test_observer_wakes_the_daemon_on_a_new_file(tmp_path):
    import threading

    pytest.importorskip("watchdog")
    from emmae.runtime.stream.watcher import start_observer

    wake = threading.Event()
    observer = start_observer(tmp_path, recursive=True, notify=wake.set)
    try:
        (tmp_path / "new.mrc").write_bytes(b"x")
        assert wake.wait(5.0)
    finally:
        observer.stop()
        observer.join(5)


def test_observer_ignores_the_output_folder(tmp_path, monkeypatch):
    import threading

    pytest.importorskip("watchdog")
    from emmae.runtime.stream.watcher import start_observer

    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    wake = threading.Event()
    observer = start_observer(Path("."), recursive=True, notify=wake.set, ignore=(tmp_path / "out").resolve())  # a relative folder
    try:
        (tmp_path / "out" / "x_autopick.star").write_bytes(b"x")
        assert not wake.wait(1.0)  # our own outputs do not wake the daemon
        (tmp_path / "new.mrc").write_bytes(b"x")
        assert wake.wait(5.0)
    finally:
        observer.stop()
        observer.join(5)
