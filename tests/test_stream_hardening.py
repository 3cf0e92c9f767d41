"""The daemon for daily use: configuration failures, bounded waits, named failures, sizes before any work.

In-process sessions (no model: nothing here is picked) look at what a scan decides;
the daemon's command line is run where its exit status is the point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emmae.config import load_config
from emmae.io.mrc import write_micrograph
from emmae.runtime.stream.daemon import Daemon, StopFlag
from emmae.runtime.stream.gate import Gate
from emmae.runtime.stream.journal import Journal
from emmae.synth import SynthParams, make_micrograph

PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)


@contextlib.contextmanager
def session(watch: Path, out: Path, *overrides: str) -> Iterator[Daemon]:
    """A daemon session without a model: scans, gates and journals, never picks."""
    config = load_config(None, ["stream.settle_s=0", "stream.poll=\"always\"", *overrides])
    live = Daemon(watch, out, config, encoder=None)  # type: ignore[arg-type]
    try:
        yield live
    finally:
        live.schedule.ready.clear()
        live.close(StopFlag("test"))
        live.release()


def micrograph(path: Path, seed: int = 1, pixel_size_A: float | None = 4.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_micrograph(path, make_micrograph(PARAMS, seed=seed).image, pixel_size_A)
    return path


def ready(live: Daemon) -> list[str]:
    return sorted(job.path.name for job in live.schedule.ready)


def daemon(args: list[str], timeout_s: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


# --- 1. a failure caused by the configuration is not the file's fault ---------------------------


def test_no_diameter_exits_2_naming_the_flag_before_any_micrograph_is_touched(tmp_path):
    watch = tmp_path / "session"
    micrograph(watch / "a.mrc")
    out = tmp_path / "out"
    done = daemon(["--watch", str(watch), "--out", str(out), "--once", "--progress", "plain"])
    assert done.returncode == 2, done.stderr
    assert "--diameter-px" in done.stderr and "--diameter-A" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing was created, no micrograph was looked at


def test_config_failure_is_recorded_as_such_and_retried_when_the_configuration_changes(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    micrograph(watch / "nopix.mrc", pixel_size_A=None)  # a header without a pixel size
    with session(watch, out, "preprocess.diameter_A=96") as live:
        live.scan()
        entry = live.journal.get("nopix.mrc")
        assert entry.state == "failed" and entry.kind == "config" and "pixel size" in entry.reason
        assert ready(live) == []
    with session(watch, out, "preprocess.diameter_A=96") as live:  # same configuration: not tried again
        live.scan()
        assert ready(live) == [] and live.journal.get("nopix.mrc").state == "failed"
    with session(watch, out, "preprocess.diameter_A=96", "preprocess.pixel_size_A=4.0") as live:  # the fix
        live.scan()
        assert ready(live) == ["nopix.mrc"]


def test_a_file_failure_is_not_retried_when_only_the_configuration_changes(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    (watch).mkdir()
    (watch / "junk.mrc").write_bytes(b"not an MRC file " * 100)
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        assert live.journal.get("junk.mrc").kind == "micrograph"
    with session(watch, out, "preprocess.diameter_px=30") as live:
        live.scan()
        assert live.journal.get("junk.mrc").state == "failed" and live.progress.failed == 1


# --- 2. --once must end: bounded wait for a file that never completes --------------------------


def test_an_incomplete_file_unchanged_for_stale_after_s_is_failed_and_retried_if_it_changes(tmp_path):
    from emmae.errors import MicrographError

    good = micrograph(tmp_path / "good.mrc").read_bytes()
    path = tmp_path / "cut.mrc"
    path.write_bytes(good[: len(good) // 2])
    gate = Gate(settle_s=1.0, stale_after_s=30.0)
    assert gate.check(path, now=0.0) == "waiting"
    assert gate.check(path, now=10.0) == "waiting"  # stable but incomplete: maybe a slow writer
    with pytest.raises(MicrographError, match="incomplete and unchanged for 3[0-9] s"):
        gate.check(path, now=35.0)
    path.write_bytes(good)  # it changed: watched again, and handed on once complete
    assert gate.check(path, now=40.0) == "waiting"
    assert gate.check(path, now=42.0) == "ready"


def test_stale_after_s_is_a_setting_with_a_default_of_minutes():
    assert 60 <= load_config().stream.stale_after_s <= 600
    assert load_config(None, ["stream.stale_after_s=5"]).stream.stale_after_s == 5


# --- 3. every failure names the file; the final summary lists them (failed.txt) -------------------


def test_failure_lines_name_the_file_and_the_summary_writes_failed_txt(tmp_path, caplog):
    watch, out = tmp_path / "session", tmp_path / "out"
    (watch / "sub").mkdir(parents=True)
    (watch / "sub" / "junk.mrc").write_bytes(b"not an MRC file " * 100)
    micrograph(watch / "ok.mrc")
    caplog.set_level(logging.INFO, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert failures and all("sub/junk.mrc" in line for line in failures)
        caplog.clear()
        live.recorder.report_failed()
    summary = caplog.text
    assert "1 micrographs failed" in summary and "sub/junk.mrc: not an MRC file" in summary
    listed = (out / "failed.txt").read_text().splitlines()
    assert listed[1].split("\t")[:2] == ["sub/junk.mrc", "micrograph"] and "not an MRC file" in listed[1]
    assert len(listed) == 2  # a header line and the one failure; the good micrograph is not there


def test_a_growing_backlog_warns_that_the_daemon_falls_behind(tmp_path, caplog):
    from emmae.runtime.jobs import Job

    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    caplog.set_level(logging.WARNING, logger="emmae.stream")
    with session(watch, out, "preprocess.diameter_px=24", "stream.queue_depth=2") as live:
        start = live.health._pace_at
        assert not live.check_pace(start + 61)  # nothing waiting
        live.schedule.ready.extend(Job(watch / f"m{i}.mrc", f"m{i}.mrc", f"m{i}") for i in range(5))
        assert live.check_pace(start + 122)  # 5 waiting, up from 0 a minute ago
        assert not live.check_pace(start + 130)  # at most once a minute
        assert not live.check_pace(start + 183)  # not growing any more
    assert "falling behind" in caplog.text


# --- 4. sizes checked before any work --------------------------------------------------------------


def test_tiny_and_elongated_micrographs_are_rejected_before_anything_is_allocated(tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    write_micrograph(watch / "tiny.mrc", np.ones((2, 2), np.float32), 4.0)
    write_micrograph(watch / "thin.mrc", np.ones((4, 1_048_575), np.int8), 4.0)  # 4 MB on disk
    write_micrograph(watch / "small.mrc", np.ones((60, 60), np.float32), 4.0)  # 2.5 diameters of 24 px
    micrograph(watch / "good.mrc")
    with session(watch, out, "preprocess.diameter_px=24") as live:
        live.scan()
        reasons = {e.path: e.reason for e in live.journal.failed()}
        assert ready(live) == ["good.mrc"]
    assert "too small for the particle diameter" in reasons["tiny.mrc"]
    assert "too small for the particle diameter" in reasons["small.mrc"]
    assert "absurdly elongated" in reasons["thin.mrc"]


def test_dimensions_are_checked_from_the_header_alone():
    from emmae.errors import MicrographSizeError
    from emmae.io.mrc import MrcLayout, check_dimensions

    check_dimensions("a.mrc", MrcLayout(4096, 4096, 1, 2, 0), diameter_px=300)
    check_dimensions("a.mrc", MrcLayout(5760, 4092, 1, 2, 0), diameter_px=300)
    with pytest.raises(MicrographSizeError, match="too small"):
        check_dimensions("a.mrc", MrcLayout(2, 2, 1, 2, 0), diameter_px=24)
    with pytest.raises(MicrographSizeError, match="elongated"):
        check_dimensions("a.mrc", MrcLayout(4, 1_048_575, 1, 2, 0), diameter_px=1)


def test_an_older_journal_is_migrated(tmp_path):
    import sqlite3

    from emmae.runtime.stream.journal import SCHEMA

    watch, out = tmp_path / "session", tmp_path / "out"
    out.mkdir()
    db = sqlite3.connect(out / "emmae-journal.sqlite")
    db.execute(SCHEMA)  # as written before kinds, hashes and relative keys
    db.execute("INSERT INTO micrographs (path, name, state, particles, outputs, updated) VALUES (?, ?, 'picked', 3, ?, 1.0)",
               (str(watch / "a.mrc"), str(watch / "a.mrc"), str(out / "a_autopick.star")))
    db.execute("INSERT INTO micrographs (path, name, state, reason, size, mtime_ns, updated) VALUES (?, ?, 'failed', 'junk', 5, 6, 2.0)",
               (str(watch / "sub" / "b.mrc"), "b.mrc"))
    db.commit()
    db.close()
    Journal(out).close()  # opened without the watched folder first (e.g. by a tool): the keys wait for a daemon
    journal = Journal(out, "hash", roots=(watch,))
    assert [e.path for e in journal.picked()] == ["a.mrc"]
    failed = journal.get("sub/b.mrc")
    assert failed.state == "failed" and failed.kind is None and not journal.wants("sub/b.mrc", 5, 6)
    journal.close()
    os.stat(out / "emmae-journal.sqlite")
