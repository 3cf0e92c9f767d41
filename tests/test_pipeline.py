"""The daemon's pipeline: bounded queues, back-pressure, overlap, cancellation, and a full disk."""

from __future__ import annotations

import os

import errno
import io
import logging
import threading
import time
from pathlib import Path

import pytest
import starfile

from emmae.config import validate_config
from emmae.errors import CorruptMRCError
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.commands import stream as daemon
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.stream import daemon as stream_daemon
from emmae.runtime.stream import recorder
from emmae.runtime.stream.daemon import Daemon, StopFlag
from emmae.runtime.jobs import Job, Picker
from emmae.runtime.stream.pipeline import Pipeline
from emmae.runtime.stream.status import Progress, StatusLine
from emmae.synth import SynthParams, write_session

needs_model = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


class GatedPipeline(Pipeline):
    """Stages replaced by fakes: ``pick`` waits for ``release``; every stage logs when it starts."""

    def __init__(self, depth: int) -> None:
        self.release = threading.Event()
        self.started: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(picker=Picker(None, None), outputs=_FakeOutputs(self), depth=depth)

    def _log(self, stage: str, job: Job) -> None:
        with self.lock:
            self.started.append((stage, job.name))

    def _prepare(self, job: Job):
        self._log("prepare", job)
        if job.name == "bad":
            raise CorruptMRCError(str(job.path), "corrupt header")
        return job, "prepared"

    def _pick(self, item):
        self._log("pick", item[0])
        assert self.release.wait(10)
        return item[0], "picks", None


class _FakeOutputs:
    """An output folder that logs each write; a micrograph named "full" finds the disk full."""

    def __init__(self, pipeline: GatedPipeline) -> None:
        self.pipeline = pipeline

    def write_micrograph(self, stem: str, picks, config, source, layout=None) -> None:
        self.pipeline._log("write", _job(stem))
        if stem == "full":
            raise OSError(errno.ENOSPC, "No space left on device")


def _job(name: str) -> Job:
    return Job(Path(f"/data/{name}.mrc"), name, name)


def _wait(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_pipeline_refuses_work_and_holds_a_bounded_number():
    pipeline = GatedPipeline(depth=1)
    accepted, deadline = 0, time.monotonic() + 10
    while accepted < 4:  # the pick stage is blocked: work piles up to the queues' bound...
        if pipeline.submit(_job(f"m{accepted}")):
            accepted += 1
        else:
            assert time.monotonic() < deadline, f"only {accepted} accepted"
            time.sleep(0.01)
    time.sleep(0.2)
    assert not pipeline.submit(_job("extra")) and not pipeline.has_room()  # ...then is refused
    # one in pick, one waiting for pick, one prepared and blocked on put, one in the inbox
    assert pipeline.in_flight == 4
    assert ("pick", "m0") in pipeline.started and ("pick", "m1") not in pipeline.started
    assert ("prepare", "m1") in pipeline.started  # the next micrograph is read while m0 is encoded
    pipeline.release.set()
    _wait(lambda: pipeline._done.qsize() == 4)
    done = pipeline.collect()
    assert [d.job.name for d in done] == ["m0", "m1", "m2", "m3"] and all(d.picks == "picks" for d in done)
    assert pipeline.in_flight == 0 and pipeline.has_room()
    assert pipeline.close() == []


def test_bad_micrograph_and_full_disk_are_reported_and_the_rest_goes_on():
    pipeline = GatedPipeline(depth=4)
    pipeline.release.set()
    for name in ("bad", "full", "good"):
        assert pipeline.submit(_job(name))
    done = {d.job.name: d for d in pipeline.close()}
    assert "corrupt header" in done["bad"].error and not done["bad"].output_error
    assert "No space left" in done["full"].error and done["full"].output_error
    assert done["good"].error is None and done["good"].picks == "picks" and done["good"].latency_s >= 0


def test_cancel_finishes_the_micrograph_in_hand_and_rolls_back_the_rest():
    pipeline = GatedPipeline(depth=4)
    for i in range(4):
        assert pipeline.submit(_job(f"m{i}"))
    _wait(lambda: ("pick", "m0") in pipeline.started)
    pipeline.cancel()
    pipeline.release.set()
    done = {d.job.name: d for d in pipeline.close()}
    assert done["m0"].picks == "picks" and not done["m0"].rolled_back
    assert all(done[f"m{i}"].rolled_back for i in (1, 2, 3))
    assert [name for stage, name in pipeline.started if stage == "pick"] == ["m0"]


def test_status_line_stays_under_the_log():
    stream = io.StringIO()
    handler = StatusLine(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.show("3 picked")
    handler.emit(logging.LogRecord("emmae", logging.INFO, __file__, 1, "picked a.mrc", None, None))
    handler.finish()
    assert stream.getvalue() == f"{StatusLine.CLEAR}3 picked{StatusLine.CLEAR}picked a.mrc\n3 picked\n"


def test_progress_reports_rate_latency_and_particles(monkeypatch):
    clock = iter([0.0, 36.0, 72.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = Progress()
    for particles in (10, 20, 30):
        progress.picked(particles, latency_s=0.5)
    assert progress.rate_per_hour() == pytest.approx(100.0)
    text = progress.summary(queued=2, settling=1)
    assert "3 picked" in text and "100/h" in text and "queue 2" in text and "0.50 s" in text and "20 particles" in text
    assert "BEHIND" not in progress.summary(queued=2, settling=1, queue_depth=2)  # what the queue holds: keeping up
    behind = progress.summary(queued=10, settling=0, queue_depth=2)
    assert "BEHIND by 10 micrographs, ~6 min of picking" in behind  # 10 at 100 per hour
    assert "BEHIND by 3 micrographs, ~108 s of picking" in progress.summary(queued=3, settling=0, queue_depth=2)
    assert "BEHIND by 30 micrographs, ~18 min of picking" in progress.summary(queued=30, settling=0, queue_depth=2)


@needs_model
def test_full_disk_is_recorded_and_retried_losing_nothing(tmp_path, monkeypatch):
    from emmae.runtime.picking.encoder import Encoder

    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 2, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0), seed=7)
    real_write = OutputFolder.write_micrograph
    calls = []

    def write_once_full(self, stem, *args):
        calls.append(stem)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, stem, *args)

    monkeypatch.setattr(OutputFolder, "write_micrograph", write_once_full)
    monkeypatch.setattr(recorder, "OUTPUT_RETRY_S", 0.5)
    config = validate_config({"preprocess": {"diameter_px": 24.0}, "stream": {"settle_s": 0.0, "poll_interval_s": 0.05}})
    session = Daemon(watch, out, config, Encoder.open())
    stop, deadline = StopFlag(), time.monotonic() + 180  # a liveness bound, generous for loaded machines
    failed_seen = False
    while len(session.journal.picked()) < len(mics):
        assert time.monotonic() < deadline, session.journal.counts()
        session.step(stop)
        failed_seen |= session.journal.counts().get("failed", 0) == 1
        session.wake.wait(0.05)
    session.close(stop)
    assert failed_seen and calls[0] == calls[-1] and len(calls) == 3  # the first one failed, then was redone
    assert session.journal.counts() == {"picked": 2}
    assert not session.recorder.retry_after  # a redone micrograph leaves no retry entry behind
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(os.path.relpath(m, m.parent.parent) for m in mics)
    session.release()


@needs_model
def test_outputs_mirror_subfolders_so_equal_names_do_not_collide(tmp_path):
    from emmae.runtime.picking.encoder import Encoder

    watch, out = tmp_path / "session", tmp_path / "out"
    params = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0)
    write_session(watch / "GridSquare_1", 1, params, seed=8)
    write_session(watch / "GridSquare_2", 1, params, seed=9)
    config = validate_config({"preprocess": {"diameter_px": 24.0}, "stream": {"settle_s": 0.0, "poll_interval_s": 0.05}})
    session = Daemon(watch, out, config, Encoder.open())
    daemon.run(session, StopFlag(), once=True)
    session.release()
    stars = sorted(str(p.relative_to(out)) for p in out.rglob("*_autopick.star") if p.name != "autopick.star")
    assert stars == ["session/GridSquare_1/mic_00000_autopick.star", "session/GridSquare_2/mic_00000_autopick.star"]
    from emmae.runtime.commands.pick import rethreshold

    before = {p: len(starfile.read(p)) for p in out.rglob("*_autopick.star") if p.name != "autopick.star"}
    fewer = config.model_copy(update={"postprocess": config.postprocess.model_copy(update={"keep_fraction": 0.5})})
    with OutputFolder.open(out) as folder:
        assert rethreshold(folder, fewer, [], {}) == 0  # finds the sub-folders' particle maps
    assert min(before.values()) > 1
    for star, count in before.items():
        assert len(starfile.read(star)) == -(-count // 2)
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert len(index) == 2


def test_one_daemon_per_output_folder(tmp_path):
    from emmae.errors import EmmaeError

    config = validate_config({"preprocess": {"diameter_px": 24.0}})
    first = Daemon(tmp_path, tmp_path / "out", config, encoder=None)
    with pytest.raises(EmmaeError, match="another emmae command is writing to"):
        Daemon(tmp_path, tmp_path / "out", config, encoder=None)
    first.close(StopFlag())
    first.release()
    second = Daemon(tmp_path, tmp_path / "out", config, encoder=None)  # free again once released
    second.close(StopFlag())
    second.release()


@needs_model
def test_journal_and_index_failures_are_survived(tmp_path, monkeypatch):
    import sqlite3

    from emmae.errors import OutputError
    from emmae.runtime.picking.encoder import Encoder
    from emmae.runtime.stream.journal import Journal

    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 3, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0), seed=10)
    failures = {"journal": 1, "index": 1}
    real_picked, real_index = Journal.mark_picked, OutputFolder.write_index

    def full_journal(self, *args):
        if failures["journal"]:
            failures["journal"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        real_picked(self, *args)

    def full_index(*args):
        if failures["index"]:
            failures["index"] -= 1
            raise OutputError("cannot write autopick.star: No space left on device")
        real_index(*args)

    monkeypatch.setattr(Journal, "mark_picked", full_journal)
    monkeypatch.setattr(OutputFolder, "write_index", full_index)
    monkeypatch.setattr(stream_daemon, "JOURNAL_RETRY_S", 0.1)
    config = validate_config({"preprocess": {"diameter_px": 24.0}, "stream": {"settle_s": 0.0, "poll_interval_s": 0.05}})
    session = Daemon(watch, out, config, Encoder.open())
    daemon.run(session, StopFlag(), once=True)
    assert failures == {"journal": 0, "index": 0}
    assert session.journal.counts() == {"picked": 3}
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(os.path.relpath(m, m.parent.parent) for m in mics)
    session.release()
