"""The streaming daemon: wires the scanner, the admission, the pipeline, the journal's owner, the model and the health.

One :class:`Daemon` per watched folder (or upstream micrographs STAR) and output folder.
Its thread scans when the :class:`~emmae.runtime.stream.schedule.Schedule` says so,
admits what is complete and sane, feeds the pipeline while it has room (back-pressure)
in the schedule's order, and records what comes back; the pipeline's threads read, pick
and write. The index files are rewritten when the schedule says so and at exit. SIGINT,
SIGTERM or a file named ``EMMAE_STOP`` created in the watched folder (:mod:`.health`)
stop it after the micrograph in hand (one left from an earlier run is reported and
ignored). Nothing here parses a micrograph, writes a file, writes the journal or decides
when or in which order: each room does its own part.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from emmae.config import EmmaeConfig, config_hash
from emmae.errors import ConfigError, EmmaeError, MicrographError
from emmae.runtime.jobs import Done, failure_kind, reason_of
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.stream.admission import Admission
from emmae.runtime.stream.journal import Journal
from emmae.runtime.stream.names import shown
from emmae.runtime.stream.health import Health, StopFlag
from emmae.runtime.stream.pipeline import InHand, Pipeline
from emmae.runtime.stream.recorder import Recorder
from emmae.runtime.stream.schedule import Schedule
from emmae.runtime.stream.scanner import Scanner, any_stat
from emmae.runtime.stream.status import Progress, StatusLine
from emmae.runtime.stream.switcher import open_model
from emmae.runtime.stream.watcher import start_observer, wants_observer

log = logging.getLogger("emmae.stream")
IN_HAND_FILE = ".emmae-in-hand"  # the micrograph the pick stage holds (see pipeline.InHand)
JOURNAL_RETRY_S = 10.0  # after the journal could not be written


class Daemon:
    """One stream: see the module docstring. ``client``: a Dask client that picks instead of this process's threads.

    Raises:
        EmmaeError: the output folder cannot be created, locked or written (another command holds it, read-only, full).
    """

    def __init__(self, watch: Path, out: Path, config: EmmaeConfig, encoder: Encoder | None, watch_star: Path | None = None,
                 status: StatusLine | None = None, threads: int | None = None, client: object | None = None,
                 stop: StopFlag | None = None, started: float | None = None) -> None:
        """``stop``: the flag the signal handlers set, also set by a stop file seen during the start-up (the session
        samples are then not read back); ``started``: when the command started (``time.time()``, default now)."""
        self.watch, self.config, self.status, self.client = watch, config, status, client
        self.outputs = OutputFolder.open(out)
        try:
            journal = Journal(out, config_hash(config), roots=(watch,))
        except (OSError, sqlite3.Error) as exc:
            self.outputs.close()
            raise EmmaeError(f"cannot use the output folder {out}: {getattr(exc, 'strerror', None) or exc}") from None
        self.health = Health(watch, out, journal.path, time.monotonic(), time.time() if started is None else started)
        self.progress = Progress()
        self.recorder = Recorder(journal, self.outputs, self.progress, config_hash(config))
        self.scanner = Scanner(watch, out, config, watch_star)
        self.admission = Admission(config, self.scanner, self.recorder)
        self.recorder.on_failed = self.admission.note_failed
        self.recorder.project = self.admission.project_root
        self.model = open_model(self.outputs, config, self.recorder, encoder, threads, self.scanner.path_of)
        if stop is not None:
            self.model.stopping = lambda: bool(stop) or self.health.stop_file_found(stop)
        self.wake = threading.Event()  # a result is ready, a file changed, or it is time to scan
        self.changed = threading.Event()  # set by the file-system observer
        self.in_hand = InHand(out / IN_HAND_FILE, watch)
        self._count_crash()
        self.pipeline = self._pipeline()
        self.schedule = Schedule(config.stream)

    @property
    def journal(self) -> Journal:
        return self.recorder.journal

    def _pipeline(self) -> Pipeline:
        depth = self.config.stream.queue_depth
        if self.client is not None:  # a Dask cluster picks; this process discovers, admits and records
            from emmae.runtime.distributed import ClusterPipeline  # optional: dask.distributed

            patch_px = ClusterPipeline.patch_px_of(self.config)
            return ClusterPipeline(self.config, self.client, self.outputs, depth, self.model.builder(patch_px), self.wake.set)
        return Pipeline(self.model.picker(), self.outputs, depth, on_done=self.wake.set, in_hand=self.in_hand)

    def _count_crash(self) -> None:
        """The micrograph in hand when the daemon last died (not a clean stop): an attempt counted, failed after ``stream.max_attempts``."""
        held = self.in_hand.left()
        if held is not None:
            with self.journal.batch():
                self.recorder.count_crash(self.scanner.key(held), self.config.stream.max_attempts, any_stat(held))

    def step(self, stop: StopFlag) -> int:
        """Record finished micrographs, scan when due, look after the model, feed the pipeline. Returns how many were picked."""
        picked = self.collect()
        if stop or self.health.stop_file_found(stop):
            return picked
        switched = self.model.step(self.pipeline.in_flight)
        if switched is not None:
            self.pipeline.close()
            self.pipeline = Pipeline(switched, self.outputs, self.config.stream.queue_depth, on_done=self.wake.set, in_hand=self.in_hand)
            self.schedule.scan_soon()
        now = time.monotonic()
        if self.schedule.scan_due(now, self.changed.is_set(), self.admission.next_due()):
            self.changed.clear()
            self.schedule.scanning(now)
            self.scan()
            self.schedule.scanned(time.monotonic() - now)
            self.check_pace(now)
        self.feed()
        return picked

    def scan(self) -> None:
        """Admit every wanted file that is complete; record those that will never do. No per-file error stops a scan."""
        if self.health.check_folders():
            self.recorder.index_stale = True
        sweep = self.scanner.sweep_due(time.monotonic())
        start = time.monotonic()
        try:
            with self.journal.batch():  # one transaction per scan, not one per file
                again = self.scanner.take_touched() | self.recorder.repick  # picked, but looked at: changed, or due again
                for path, name, stat in self.scanner.candidates(self.recorder.picked, sweep, again):
                    self._consider(path, name, stat)
                self.recorder.adopt()
        except sqlite3.Error:
            self.admission.clear()  # what this scan recorded was rolled back: look at everything again
            raise
        if sweep:
            self.forget_gone()
            self.scanner.swept(time.monotonic() - start)

    def forget_gone(self) -> None:
        """Failed micrographs deleted since are forgotten (at every sweep, and at exit)."""
        for key in self.recorder.forget_gone(self.scanner.exists):
            self.admission.forget(self.scanner.path_of(key), key)

    def _consider(self, path: Path, name: str | None, stat: os.stat_result | None) -> None:
        key = self.scanner.key(path)
        if self.schedule.later(key, self.recorder.retry_after.get(key, 0.0), time.monotonic()):
            return
        try:
            job = self.admission.consider(path, name, key, stat)
        except sqlite3.Error:
            raise  # the journal cannot be written (full disk): the loop waits and tries again
        except FileNotFoundError:
            self.admission.forget(path, key)  # gone meanwhile
            return
        except Exception as exc:  # noqa: BLE001 - no per-file error stops the daemon
            if not isinstance(exc, (MicrographError, ConfigError)):
                log.exception("unexpected error looking at %s", shown(key))
            now = any_stat(path)
            self.recorder.failed(key, self.admission.name(path, name), reason_of(exc), now and now.st_size, now and now.st_mtime_ns,
                                 failure_kind(exc))
            return
        if job is not None:
            self.schedule.admit(key, job, again=key in self.recorder.repick)

    def feed(self) -> None:
        """Move admitted micrographs into the pipeline while it has room (back-pressure), in the schedule's order; none
        while the model is switched."""
        while self.pipeline.has_room() and not self.model.switching:
            job = self.schedule.next_job(self.pipeline.in_flight)
            if job is None:
                break
            key = self.scanner.key(job.path)
            if key not in self.recorder.repick:
                self.recorder.handed_on(key, job.name, job.size, job.mtime_ns)  # one picked again stays listed as picked until it is
            self.pipeline.submit(job)

    def collect(self, results: list[Done] | None = None) -> int:
        """Record finished micrographs; rewrite the index files if due."""
        results = self.pipeline.collect() if results is None else results
        self.schedule.finished([self.scanner.key(done.job.path) for done in results])
        figures = None if self.status is not None else self.summary  # live: the status line shows them
        picked = sum(self.recorder.record(done, self.scanner.key(done.job.path), self.model.id, figures) for done in results)
        self._repick_provisional({(done.picks.session or {}).get("id") for done in results if done.picks is not None})
        if self.schedule.index_due(self.recorder.index_stale, time.monotonic()):
            self.write_index()
        return picked

    def write_index(self) -> None:
        start = time.monotonic()
        try:
            self.recorder.write_index(self.config)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the journal has every pick; tried again later
            log.error("cannot rewrite the index files: %s (the journal has every pick)", exc)
        self.schedule.indexed(start, time.monotonic())

    def _repick_provisional(self, sessions: set[str | None]) -> None:
        """Once the stream's session is fixed, what provisional sessions picked is picked again with it: once per fixed
        session, and again for a micrograph recorded later with a provisional one (``sessions``: those just recorded;
        it was in the pipeline while the session was fitted on its own thread)."""
        builder = self.pipeline.builder
        frozen = builder.frozen if builder is not None else None
        fixed = frozen.digest() if frozen is not None else None
        late = fixed is not None and fixed == self.schedule.repicked_for and bool(sessions - {None, fixed})
        if not (self.schedule.repick_due(fixed) or late):
            return
        before = set(self.recorder.repick)
        again = [key for key in self.recorder.repick_other_sessions(fixed, self.model.id) if key not in before]
        if again:
            self.schedule.scan_soon()
            log.info("session %s fixed: the %d micrographs picked with a provisional session%s are picked again with it", fixed, len(again),
                     " while it was fitted" if late else "")

    def close(self, stop: StopFlag) -> None:
        """Stop the pipeline: roll back what has not started if stopping, else let it finish; record the rest. A session
        fit running on its own thread is waited for (seconds): it is saved while the output folder is still ours."""
        if stop:
            self.pipeline.cancel()
        self.collect(self.pipeline.close())
        if self.pipeline.builder is not None:
            self.pipeline.builder.wait()
        self.model.stop()

    def release(self) -> None:
        """Close the journal and free the output folder for another command."""
        self.journal.close()
        self.outputs.close()

    @property
    def queued(self) -> int:
        return self.schedule.waiting + self.pipeline.in_flight

    def summary(self) -> str:
        adapting = self.model.status()
        return self.progress.summary(self.queued, self.admission.pending, self.config.stream.queue_depth) + (f" | {adapting}" if adapting else "")

    def check_pace(self, now: float) -> bool:
        return self.health.check_pace(now, self.queued, self.config.stream.queue_depth, self.progress.rate_per_hour)

    def notice_change(self) -> None:
        """Called by the file-system observer (its thread): scan soon."""
        self.changed.set()
        self.wake.set()

    def backlog_done(self) -> bool:
        """Nothing in the pipeline or admitted, and no file in the folder still waiting (for ``--once``)."""
        builder = self.pipeline.builder
        if self.model.busy() or (builder is not None and builder.fitting):
            return False  # the model's work, or the session's fit (then the re-picks it brings), is still to come
        now = time.monotonic()
        for key in list(self.recorder.repick):
            if any_stat(self.scanner.path_of(key)) is None:
                self.recorder.repick.discard(key)  # gone: its picks stay as they are
            elif key not in self.schedule.queued:
                return False
        for path, _, _ in self.scanner.candidates(self.recorder.picked):
            key = self.scanner.key(path)
            if self.schedule.later(key, self.recorder.retry_after.get(key, 0.0), now):
                continue
            stat = any_stat(path)
            if stat is not None and self.recorder.wants(key, stat, Path(path)):
                return False
        return not self.queued


def run(daemon: Daemon, stop: StopFlag, once: bool, until: Callable[[], bool] | None = None) -> None:
    """Scan, feed and record until stopped (with ``once``: until the backlog is picked, once ``until()`` holds)."""
    stream = daemon.config.stream
    observer = None
    if wants_observer(daemon.watch, stream.poll):
        observer = start_observer(daemon.watch, stream.recursive, daemon.notice_change, ignore=daemon.outputs.root.resolve(),
                                  on_path=daemon.scanner.notice_path)
    try:
        _loop(daemon, stop, once, until)
    finally:
        if observer is not None:
            observer.stop()
        daemon.close(stop)
        if daemon.status is not None:
            daemon.status.show(daemon.summary())  # the final figures stay on screen
            daemon.status.finish()
    daemon.write_index()
    daemon.forget_gone()
    daemon.recorder.report_failed()
    log.info("journal: %s", daemon.journal.counts())


def _loop(daemon: Daemon, stop: StopFlag, once: bool, until: Callable[[], bool] | None) -> None:
    while True:
        try:
            daemon.step(stop)
        except sqlite3.OperationalError as exc:  # e.g. a full disk; what was not recorded is redone, nothing is lost
            log.error("cannot write the journal (%s): trying again in %g s", exc, JOURNAL_RETRY_S)
            time.sleep(JOURNAL_RETRY_S)
            continue
        if stop or (once and (until is None or until()) and daemon.backlog_done()):
            return
        if daemon.status is not None:
            daemon.status.show(daemon.summary())
        daemon.wake.wait(daemon.schedule.wait_s(time.monotonic(), daemon.admission.next_due()))  # a settling file: when it has settled
        daemon.wake.clear()
