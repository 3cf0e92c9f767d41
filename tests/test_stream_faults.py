"""Fault injection against the daemon: hostile names, links, FIFOs, writers, replacements, spellings, folders.

Each scenario ends with every micrograph either picked from its complete, final content
exactly once or failed with its reason, and the daemon still running. In-process
sessions (no model) check what a scan decides in milliseconds; the daemon's command
line runs (in a subprocess, seeded data) where picks or exit status are the point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

from emmae.io.mrc import write_micrograph
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.stream.daemon import StopFlag
from emmae.runtime.stream.gate import Gate
from emmae.runtime.stream.journal import Journal
from tests.test_stream_hardening import daemon, micrograph, ready, session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
BAD_NAMES = ["tab\there.mrc", "new\nline.mrc", "hash#tag.mrc", "it's.mrc", 'say "x".mrc']
GOOD_NAMES = ["with space.mrc", "unicodé µ.mrc", "data_001.mrc"]  # written as absolute paths: no STAR keyword starts them


def _index_names(out: Path) -> list[str]:
    return list(starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]["rlnMicrographName"])


# --- 1. names --------------------------------------------------------------------------------------


def test_odd_names_never_crash_the_scan_or_corrupt_the_index(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    source = micrograph(watch / "plain.mrc").read_bytes()
    for name in BAD_NAMES + GOOD_NAMES:
        (watch / name).write_bytes(source)
    with open(os.fsencode(watch) + b"/latin1_caf\xe9.mrc", "wb") as handle:  # not UTF-8
        handle.write(source)
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        live.scan()  # a second look records nothing twice and raises nothing
        failed = {e.path: e.reason for e in live.journal.failed()}
        assert ready(live) == sorted(["plain.mrc", *GOOD_NAMES])
        for job in live.schedule.ready:  # as if picked: the index must carry every safe name
            live.journal.mark_picked(live.scanner.key(job.path), job.name, 1, str(out / "x_autopick.star"), {})
        (out / "x_autopick.star").write_text("")
        live.write_index()
    assert set(failed) == {*BAD_NAMES, "latin1_caf\\xe9.mrc"}
    assert all("rename the file" in reason for reason in failed.values())
    assert sorted(Path(n).name for n in _index_names(out)) == sorted(["plain.mrc", *GOOD_NAMES])
    with session(watch, out, "preprocess.diameter_px=24") as live:  # a restart on the same journal
        live.scan()
        assert live.progress.failed == len(failed)


def test_an_unsafe_name_left_in_an_older_journal_is_kept_out_of_the_index(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    journal = Journal(out)
    (out / "a_autopick.star").write_text("")
    journal.mark_picked("tab\tname.mrc", str(watch / "tab\tname.mrc"), 1, str(out / "a_autopick.star"), {})
    journal.mark_picked("a.mrc", str(watch / "a.mrc"), 1, str(out / "a_autopick.star"), {})
    journal.close()
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.write_index()  # raised csv.Error (need to escape) at every start
    assert _index_names(out) == [str(watch / "a.mrc")]


def test_symlink_loops_and_dangling_links_are_failed_not_fatal(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    micrograph(watch / "real.mrc")
    os.symlink("b.mrc", watch / "a.mrc")
    os.symlink("a.mrc", watch / "b.mrc")
    os.symlink("real.mrc", watch / "link.mrc")  # a good link is picked
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        failed = {e.path: e.reason for e in live.journal.failed()}
        assert ready(live) == ["link.mrc", "real.mrc"]
    assert set(failed) == {"a.mrc", "b.mrc"} and all("symbolic links" in r for r in failed.values())


def test_a_fifo_named_mrc_is_failed_without_blocking(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    micrograph(watch / "ok.mrc")
    fifo = watch / "pipe.mrc"
    os.mkfifo(fifo)
    with session(watch, out, "preprocess.diameter_px=24") as live:
        def give_up(signum, frame):  # a blocked open() is interrupted, not retried, when the handler raises
            raise TimeoutError("the scan blocked opening a FIFO")

        previous = signal.signal(signal.SIGALRM, give_up)
        signal.setitimer(signal.ITIMER_REAL, 10.0)
        try:
            live.scan()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert "not a regular file" in live.journal.get("pipe.mrc").reason
        assert ready(live) == ["ok.mrc"]


# --- 2. sizes: see test_stream_hardening and test_header_fuzz -------------------------------------

# --- 4. writers that set the full size first ------------------------------------------------------


def test_a_preallocated_file_is_not_ready_until_filled(tmp_path):
    payload = micrograph(tmp_path / "src.mrc").read_bytes()
    target = tmp_path / "pre.mrc"
    with open(target, "wb") as handle:
        handle.truncate(len(payload))  # full size at once, zeros
    gate = Gate(settle_s=1.0, stale_after_s=60.0)
    clock = 0.0
    assert gate.check(target, now=clock) == "waiting"
    with open(target, "r+b") as handle:
        for start in range(0, len(payload), 60_000):
            handle.seek(start)
            handle.write(payload[start : start + 60_000])
            handle.flush()
            clock += 5.0  # pauses longer than settle_s: size stable, content not
            if start + 60_000 < len(payload):
                assert gate.check(target, now=clock) in ("waiting",)
                assert gate.check(target, now=clock + 2.0) == "waiting", f"handed on with {start + 60_000} of {len(payload)} bytes"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # the final write, seen as a change
    assert gate.check(target, now=clock + 3.0) == "waiting"
    assert gate.check(target, now=clock + 5.0) == "ready"


def test_a_file_that_stays_zero_filled_is_taken_after_stale_after_s(tmp_path):
    data = np.zeros((256, 256), np.float32)
    data[:10] = 1.0  # real content, with a zero tail (e.g. a masked edge)
    write_micrograph(tmp_path / "edge.mrc", data, 4.0)
    gate = Gate(settle_s=1.0, stale_after_s=30.0)
    assert gate.check(tmp_path / "edge.mrc", now=0.0) == "waiting"
    assert gate.check(tmp_path / "edge.mrc", now=5.0) == "waiting"
    assert gate.check(tmp_path / "edge.mrc", now=31.0) == "ready"
    watch = tmp_path / "session"
    watch.mkdir()
    os.replace(tmp_path / "edge.mrc", watch / "edge.mrc")
    with session(watch, tmp_path / "out", "preprocess.diameter_px=24", "stream.stale_after_s=0.3") as live:  # the daemon's way
        live.scan()
        assert ready(live) == []
        time.sleep(0.4)
        live.scan()
        assert ready(live) == ["edge.mrc"] and not live.journal.failed()


def test_a_pick_of_a_file_that_changed_while_read_is_never_recorded(tmp_path, monkeypatch):
    from emmae.runtime import jobs
    from emmae.runtime.jobs import Picker, admit
    from emmae.runtime.stream import pipeline as stages
    from emmae.runtime.stream.pipeline import Pipeline

    path = micrograph(tmp_path / "a.mrc")
    config = __import__("emmae.config", fromlist=["load_config"]).load_config(None, ["preprocess.diameter_px=24"])
    job = admit(path, "a.mrc", "a", config)

    def read_while_written(source, config, encoder, name=None, layout=None, diameter_px=None):  # the read of a file a writer is still filling
        with open(source, "ab") as handle:
            handle.write(b"\x01" * 100)
        return "prepared"

    class Outputs:
        def write_micrograph(self, stem, picks, config, source, layout=None):
            written.append(picks)

    monkeypatch.setattr(jobs, "prepare", read_while_written)
    monkeypatch.setattr(stages, "pick_read", lambda job, prepared, picker: ("picks", None))
    written = []
    pipe = Pipeline(Picker(config, None), Outputs(), depth=2)  # type: ignore[arg-type]
    pipe.submit(job)
    results = pipe.close()
    assert len(results) == 1 and results[0].picks is None and written == []
    assert getattr(results[0], "changed", False) and "changed while it was read" in results[0].error


# --- 5. a replaced micrograph is picked again ------------------------------------------------------


def test_a_picked_file_replaced_is_picked_again_and_its_old_outputs_removed(tmp_path, caplog):
    watch, out = tmp_path / "session", tmp_path / "out"
    path = micrograph(watch / "a.mrc", seed=1)
    micrograph(watch / "b.mrc", seed=2)
    out.mkdir()
    journal = Journal(out)
    for name in ("a", "b"):
        stat = os.stat(watch / f"{name}.mrc")
        (out / f"{name}_autopick.star").write_text("")
        (out / f"{name}_emmae.npz").write_text("")
        journal.mark_picked(f"{name}.mrc", str(watch / f"{name}.mrc"), 5, str(out / f"{name}_autopick.star"), {},
                            stat.st_size, stat.st_mtime_ns, stat.st_ino)
    journal.close()
    replacement = tmp_path / "new.mrc"
    write_micrograph(replacement, np.ones((256, 256), np.float32), 4.0)
    os.replace(replacement, path)  # mv over it
    caplog.set_level(logging.WARNING, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        assert ready(live) == ["a.mrc"]  # b is unchanged
    assert "a.mrc changed since it was picked" in caplog.text
    assert not (out / "a_autopick.star").exists() and not (out / "a_emmae.npz").exists()
    assert (out / "b_autopick.star").exists()


def test_a_replacement_while_running_is_noticed_from_the_observers_event(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    path = micrograph(watch / "a.mrc", seed=1)
    with session(watch, out, "preprocess.diameter_px=24") as live:
        stat = os.stat(path)
        live.journal.mark_picked("a.mrc", str(path), 5, str(out / "a_autopick.star"), {}, stat.st_size, stat.st_mtime_ns, stat.st_ino)
        live.recorder.picked["a.mrc"] = live.journal.get("a.mrc")
        live.scan()  # the first scan also checks every picked file: unchanged
        assert ready(live) == []
        micrograph(tmp_path / "new.mrc", seed=2)
        os.replace(tmp_path / "new.mrc", path)
        live.scan()  # no event, next check of picked files a minute away: not looked at yet
        assert ready(live) == []
        live.scanner.notice_path(os.path.realpath(path))  # what the observer reports
        live.scan()
        assert ready(live) == ["a.mrc"]


# --- 6. two spellings of the watched folder ---------------------------------------------------------


def test_two_spellings_of_the_watched_folder_share_one_journal(tmp_path, monkeypatch):
    watch, out = tmp_path / "session", tmp_path / "out"
    micrograph(watch / "sub" / "a.mrc")
    monkeypatch.chdir(tmp_path)
    keys = []
    for spelling in (watch, Path("session"), Path("./session/"), tmp_path / "." / "session"):
        with session(spelling, out, "preprocess.diameter_px=24") as live:
            live.scan()
            keys += [live.scanner.key(job.path) for job in live.schedule.ready]
            assert [job.stem for job in live.schedule.ready] == ["session/sub/a"]  # never a second sub-tree
    assert keys == ["sub/a.mrc"] * 4


# --- 7. idle cost: the daemon's own reads do not wake it -------------------------------------------


def test_reading_a_file_does_not_wake_the_observer(tmp_path):
    pytest.importorskip("watchdog")
    from emmae.runtime.stream.watcher import start_observer

    path = tmp_path / "a.mrc"
    path.write_bytes(b"x" * 2048)
    wake = threading.Event()
    observer = start_observer(tmp_path, recursive=True, notify=wake.set)
    try:
        time.sleep(0.3)
        wake.clear()
        for _ in range(5):
            with open(path, "rb") as handle:  # what the gate does to an unfinished file
                handle.read(1024)
        assert not wake.wait(1.0), "a read woke the daemon"
        with open(path, "ab") as handle:
            handle.write(b"y")
        assert wake.wait(5.0)  # a write still does
    finally:
        observer.stop()
        observer.join(5)


def test_an_unfinished_file_is_read_once_per_version_not_at_every_scan(tmp_path, monkeypatch):
    from emmae.runtime.stream import gate as gating

    path = tmp_path / "cut.mrc"
    path.write_bytes(micrograph(tmp_path / "src.mrc").read_bytes()[:5000])
    reads = []
    real = gating.check_complete
    monkeypatch.setattr(gating, "check_complete", lambda p: reads.append(p) or real(p))
    gate = Gate(settle_s=0.0, stale_after_s=1000.0)
    for second in range(50):
        assert gate.check(path, now=float(second)) == "waiting"
    assert len(reads) == 1


# --- 8. folders, order, counts, stop file ----------------------------------------------------------


def test_an_output_folder_that_cannot_be_used_exits_2_with_one_line(tmp_path):
    watch = tmp_path / "session"
    micrograph(watch / "a.mrc")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        done = daemon(["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--once", "--progress", "plain"])
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
        assert len(errors) == 1 and "cannot use the output folder" in errors[0], done.stderr


def _mounted(path: Path, options: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_full_or_read_only_output_folder_exits_2_with_one_line(tmp_path):
    watch = tmp_path / "session"
    micrograph(watch / "a.mrc")
    full, read_only = tmp_path / "full", tmp_path / "ro"
    if not (_mounted(full, "size=64k") and _mounted(read_only, "ro,size=64k")):
        subprocess.run(["umount", str(full)], capture_output=True)
        pytest.skip("needs root and tmpfs mounts to make a full and a read-only folder")
    try:
        with open(full / "filler", "wb", buffering=0) as handle:  # fill it
            with contextlib.suppress(OSError):
                while True:
                    handle.write(bytes(4096))
        for out in (full / "out", read_only / "out", read_only):
            done = daemon(["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--once", "--progress", "plain"])
            assert done.returncode == 2, done.stderr
            errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
            assert len(errors) == 1 and "cannot use the output folder" in errors[0], done.stderr
    finally:
        for folder in (full, read_only):
            subprocess.run(["umount", str(folder)], capture_output=True)


def test_deleted_folders_are_warned_about_and_the_index_lists_only_outputs_on_disk(tmp_path, caplog):
    watch, out = tmp_path / "session", tmp_path / "out"
    micrograph(watch / "a.mrc")
    caplog.set_level(logging.WARNING, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        for name in ("a", "b"):
            (out / f"{name}_autopick.star").write_text("")
            live.journal.mark_picked(f"{name}.mrc", f"{name}.mrc", 1, str(out / f"{name}_autopick.star"), {})
        (out / "b_autopick.star").unlink()  # its output is gone
        live.write_index()
        assert _index_names(out) == ["a.mrc"]
        shutil.rmtree(watch)
        live.scan()
        live.scan()
    assert caplog.text.count("the watched folder") == 1  # warned once, and the daemon goes on


def test_order_oldest_is_by_time_not_by_name(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    for i, name in enumerate(["b10.mrc", "b2.mrc", "b1.mrc"]):
        path = micrograph(watch / name, seed=i)
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # b10 oldest, b1 newest
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        assert [job.path.name for job in live.schedule.ready] == ["b10.mrc", "b2.mrc", "b1.mrc"]
    with session(watch, tmp_path / "out2", "preprocess.diameter_px=24", 'stream.order="newest"') as live:
        live.scan()
        assert [job.path.name for job in live.schedule.ready] == ["b1.mrc", "b2.mrc", "b10.mrc"]


def test_the_failed_count_matches_the_journal(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    junk = watch / "junk.mrc"
    with session(watch, out, "preprocess.diameter_px=24") as live:
        for attempt in range(3):  # the same file fails three times (it changes in between)
            junk.write_bytes(b"not an MRC file " * (100 + attempt))
            live.scan()
            live.scan()
        assert live.journal.get("junk.mrc").state == "failed"
        assert live.progress.failed == live.journal.counts().get("failed", 0) == 1
        assert "1 failed" in live.summary()
    with session(watch, out, "preprocess.diameter_px=24") as live:  # a restart counts what the journal holds
        assert "1 failed" in live.summary()


def test_a_stop_file_left_by_an_earlier_run_is_reported_not_obeyed(tmp_path, caplog):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    (watch / "EMMAE_STOP").touch()
    os.utime(watch / "EMMAE_STOP", ns=(10**18, 10**18))
    caplog.set_level(logging.INFO, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        stop = StopFlag()
        assert not live.health.stop_file_found(stop) and not stop
        assert "left from an earlier run" in caplog.text
        (watch / "EMMAE_STOP").touch()  # touched while the daemon runs: obeyed
        assert live.health.stop_file_found(stop) and stop.reason == "EMMAE_STOP"


# --- 9. the daemon itself against a hostile folder -------------------------------------------------


def _write_hostile_folder(watch: Path) -> tuple[list[str], list[str]]:
    """A folder of everything that went wrong, and one good micrograph. Returns (good names, bad keys)."""
    good = micrograph(watch / "good ü.mrc", seed=7)
    payload = good.read_bytes()
    (watch / "empty.mrc").write_bytes(b"")
    (watch / "truncated.mrc").write_bytes(payload[: len(payload) // 3])
    (watch / "header_only.mrc").write_bytes(payload[:1024])
    write_micrograph(watch / "tiny.mrc", np.ones((2, 2), np.float32), 4.0)
    os.mkfifo(watch / "fifo.mrc")
    os.symlink("loop_b.mrc", watch / "loop_a.mrc")
    os.symlink("loop_a.mrc", watch / "loop_b.mrc")
    for name in BAD_NAMES:
        (watch / name).write_bytes(payload)
    with open(os.fsencode(watch) + b"/latin1_caf\xe9.mrc", "wb") as handle:
        handle.write(payload)
    bad = ["empty.mrc", "truncated.mrc", "header_only.mrc", "tiny.mrc", "fifo.mrc", "loop_a.mrc", "loop_b.mrc",
           *(n.replace("\t", "\\t").replace("\n", "\\n") for n in BAD_NAMES), "latin1_caf\\xe9.mrc"]
    return ["good ü.mrc"], bad


@needs_model
def test_once_on_a_hostile_folder_ends_with_each_file_picked_or_failed(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    good, bad = _write_hostile_folder(watch)
    stale_after_s = 3
    start = time.monotonic()
    done = daemon(["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0.2",
                   "--poll-interval-s", "0.2", "--stale-after-s", str(stale_after_s), "--once", "--progress", "plain"],
                  timeout_s=stale_after_s + 60 + 60)  # + one minute, + the pick on a loaded machine
    assert done.returncode == 3, done.stderr  # stopped cleanly, some failed
    assert time.monotonic() - start < stale_after_s + 120
    assert [Path(n).name for n in _index_names(out)] == good
    listed = {line.split("\t")[0]: line for line in (out / "failed.txt").read_text().splitlines()[1:]}
    assert sorted(listed) == sorted(bad)
    assert all(len(line.split("\t")) == 3 and line.split("\t")[2] for line in listed.values())  # each with its reason
    assert "Traceback" not in done.stderr and f"{len(bad)} micrographs failed" in done.stderr
    for line in done.stderr.splitlines():
        if " ERROR failed " in line:
            assert any(key in line for key in bad), line  # every failure line names its file


@needs_model
def test_replaced_file_and_two_spellings_across_restarts(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    a = micrograph(watch / "a.mrc", seed=11)
    micrograph(watch / "b.mrc", seed=12)
    micrograph(watch / "nopix.mrc", seed=13, pixel_size_A=None)  # fails for the configuration, in both runs
    common = ["--out", str(out), "--diameter-A", "96", "--settle-s", "0.2", "--poll-interval-s", "0.2", "--once", "--progress", "plain"]
    first = daemon(["--watch", str(watch), *common], timeout_s=300)
    assert first.returncode == 3, first.stderr  # nopix.mrc failed
    assert first.stderr.count(" INFO picked ") == 2 and "failed nopix.mrc" in first.stderr
    replacement = tmp_path / "a-new.mrc"
    micrograph(replacement, seed=21)
    os.replace(replacement, a)  # a new version under the same name
    second = daemon(["--watch", "session", *common], timeout_s=300, cwd=tmp_path)  # relative spelling
    assert second.returncode == 3, second.stderr
    assert "a.mrc changed since it was picked" in second.stderr
    picked_again = sorted(line.split(" INFO picked ")[1].split(":")[0] for line in second.stderr.splitlines() if " INFO picked " in line)
    assert picked_again == ["a.mrc"]  # b unchanged: not picked twice under the other spelling
    assert "nopix.mrc" not in second.stderr.split("micrographs failed")[0]  # same configuration: not tried again
    assert sorted(Path(n).name for n in _index_names(out)) == ["a.mrc", "b.mrc"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_autopick.star") if p.name != "autopick.star") == [
        "session/a_autopick.star", "session/b_autopick.star"]
    journal = Journal(out)
    assert journal.counts() == {"picked": 2, "failed": 1}
    journal.close()


@needs_model
def test_sigterm_stops_a_daemon_facing_a_fifo(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    os.mkfifo(watch / "pipe.mrc")
    code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
    live = subprocess.Popen([sys.executable, "-c", code, "--watch", str(watch), "--out", str(out), "--diameter-px", "24",
                             "--settle-s", "0", "--poll-interval-s", "0.2", "--progress", "plain"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "emmae-journal.sqlite").exists():
            time.sleep(0.2)
        time.sleep(2.0)  # a few scans with the FIFO in the folder
        live.send_signal(signal.SIGTERM)
        output, _ = live.communicate(timeout=30)
    finally:
        if live.poll() is None:
            try:  # release a reader blocked on the FIFO
                os.close(os.open(watch / "pipe.mrc", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            live.kill()
            live.communicate()
    assert live.returncode == 3, output  # stopped cleanly; the FIFO failed
    assert "not a regular file" in output
