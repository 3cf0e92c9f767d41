"""``emmae-stream``: pick micrographs as they land, keep the model loaded, lose nothing.

    emmae-stream --watch /data/session --diameter-A 300 [--out DIR] [--once] [--settle-s 5]
    emmae-stream --demo                 # a simulated session picked live, no data needed

Scans (every ``stream.poll_interval_s``, sooner on a file-system event) find candidate
files; each is handed on once it is stable for ``stream.settle_s`` and passes the strict
MRC check, and its header's size can hold particles of the given diameter. A file still
incomplete after ``stream.stale_after_s`` without a change is recorded as failed. A
pipeline of three threads joined by bounded queues (``stream.queue_depth``) reads and
preprocesses, picks with the model loaded once, and writes the outputs atomically, so
disk, CPU and accelerator overlap and memory stays bounded. Each result is recorded in the
SQLite journal (keyed on the path below the watched folder) and the session index
``autopick.star`` is rewritten atomically. A bad micrograph is recorded with its reason
and retried only if the file changes; one that failed for the configuration (no pixel
size for --diameter-A, too small for the diameter) also when the configuration changes;
one whose outputs could not be written (a full disk) after 30 s. A picked micrograph
replaced by a new version is picked again. At exit the failed micrographs are listed,
and written to failed.txt. SIGINT, SIGTERM or a file named ``EMMAE_STOP`` created in the
watched folder while the daemon runs stop it after the micrograph in hand (those queued
behind it are rolled back; one left from an earlier run is reported and ignored);
``--once`` picks the backlog and exits. Restarting resumes from the journal. Outputs
mirror the micrographs' sub-folders. One daemon per output folder (``emmae.lock``).
On a terminal a status line (rate, queue, last latency, particles) is redrawn under the log.
With ``--adapt N`` the model is fine-tuned on the first N picked micrographs in a separate
process (emmae-adapt; needs torch) while picking goes on; then, between two micrographs,
the daemon switches to the adapted model (kept in OUT/emmae-adapt/ and across restarts),
fits its session on those micrographs and picks again what the old model picked
(``--adapt-then mark``: only records it). The journal names the model of every pick.
Exit status: 0 stopped cleanly; 2 bad arguments (no diameter), configuration, model, or an
output folder that cannot be used (busy, read-only, full, not a folder).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from emmae.backend import get_backend
from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import ConfigError, EmmaeError, MicrographError, OutputError, UnsafeNameError
from emmae.io.atomic import TEMP_PREFIX, remove_stale_temporaries, write_bytes_atomic
from emmae.io.inputs import micrographs_from_star
from emmae.io.picks import micrograph_name, write_index
from emmae.memory import retain_freed_memory
from emmae.runtime.cli import write_outputs
from emmae.runtime.encoder import Encoder, bundle_path
from emmae.runtime.options import add_common_arguments, add_output_arguments, check_threads, log_level, output_switches, plain_text
from emmae.runtime.picker import Picks, StreamSession, prepare
from emmae.runtime.stream.adapter import Adapter, check_can_adapt, model_id
from emmae.runtime.stream.demo import DEMO_DIAMETER_A, Acquisition
from emmae.runtime.stream.gate import Gate, stat_regular, walk
from emmae.runtime.stream.journal import Entry, Journal, changed_since_picked, journal_key
from emmae.runtime.stream.pipeline import Done, Job, Pipeline, check_job, check_layout, failure_kind, unchanged
from emmae.runtime.stream.status import Progress, StatusLine
from emmae.runtime.stream.watcher import start_observer, wants_observer

log = logging.getLogger("emmae.stream")
STOP_FILE = "EMMAE_STOP"
LOCK_FILE = "emmae.lock"
MIN_SCAN_INTERVAL_S = 0.25  # file-system events trigger scans no more often than this
SCAN_SHARE = 0.02  # ... nor more often than every 50 scan-times (scans of a huge folder use at most 2 % of a core)
MAX_SCAN_INTERVAL_S = 30.0  # ... but at least this often
INDEX_INTERVAL_S = 1.0  # the session index (every pick so far) is rewritten at most this often (more rarely when large), and at exit
JOURNAL_RETRY_S = 10.0  # after the journal could not be written
OUTPUT_RETRY_S = 30.0  # a micrograph whose outputs could not be written (full disk) is retried after this
SWEEP_INTERVAL_S = 60.0  # every picked file is checked for a new version at least this often (sooner on an observer's event)
PACE_INTERVAL_S = 60.0  # how often the backlog is compared with the last look (a growing backlog: falling behind)
SESSION_FILE = "emmae-session.json"  # the stream's clusters, particle choice and template
FAILED_FILE = "failed.txt"
WRITE_TEST_BYTES = 1 << 16  # written (and removed) at the start: an output folder without room for this cannot be used
FAILED_SHOWN = 50  # failed micrographs listed in the final summary (all are in FAILED_FILE)
OUTPUT_SUFFIXES = ("_autopick.star", "_emmae.npz", ".box", ".cbox", "_preview.png")  # a micrograph's outputs beside its stem
UNSAFE_CHARACTERS = frozenset("#'\"")  # break a STAR value (a comment, a quote)
STAR_RESERVED = ("data_", "loop_", "save_", "global_", "stop_")  # a STAR value cannot start with these


@dataclass
class StopFlag:
    """Set by a signal handler or the stop file; checked between micrographs."""

    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.reason)

    def handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        log.info("%s received: stopping after the micrograph in hand", self.reason)


def lock_folder(out: Path) -> TextIO:
    """Hold ``out``'s lock file for as long as the returned handle is open.

    Raises:
        EmmaeError: another daemon is writing to ``out``.
    """
    handle = open(out / LOCK_FILE, "a")  # noqa: SIM115 - held open for the session
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EmmaeError(f"another emmae-stream is writing to {out} (it holds {out / LOCK_FILE})") from None
    return handle


class Session:
    """One watched folder (or upstream micrographs STAR), its output folder, journal, gate and pipeline.

    The caller's thread scans, gates, feeds the pipeline and records results in the
    journal (its only writer); the pipeline's threads read, pick and write outputs.
    Every micrograph is keyed on its path relative to the watched folder, so two
    spellings of the folder (absolute, relative, through a link) are one session.

    Raises:
        EmmaeError: the output folder cannot be created, locked or written (another
            daemon holds it, read-only, full, not a folder).
    """

    def __init__(self, watch: Path, out: Path, config: EmmaeConfig, encoder: Encoder, watch_star: Path | None = None,
                 status: StatusLine | None = None, threads: int | None = None, client: object | None = None) -> None:
        self.watch, self.out, self.config, self.watch_star, self.status = watch, out, config, watch_star, status
        self._prefix = str(watch).rstrip("/") + "/"  # scanned paths start with it: their key is what follows
        self._abs_prefix = os.path.abspath(watch).rstrip("/") + "/"
        self._real_root = os.path.realpath(watch)  # the observer reports paths under it
        self.config_hash = config_hash(config)
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = lock_folder(out)
            stale = remove_stale_temporaries(out)
            self.journal = Journal(out, self.config_hash, roots=(watch,))
            _write_test(out)  # a read-only or full folder fails here, not mid-run
        except (OSError, sqlite3.Error) as exc:
            if getattr(self, "_lock", None) is not None:
                self._lock.close()
            raise EmmaeError(f"cannot use the output folder {out}: {getattr(exc, 'strerror', None) or exc}") from None
        if stale:
            log.info("removed %d temporary files left in %s by an interrupted run", len(stale), out)
        self.gate = Gate(config.stream.settle_s, config.stream.stale_after_s, check=lambda path, layout: check_layout(path, layout, config))
        self.progress = Progress()
        self.wake = threading.Event()  # a result is ready, a file changed, or it is time to scan
        self.changed = threading.Event()  # set by the file-system observer
        self.threads = threads
        self.adapter = Adapter(out, config, self.journal, encoder.bundle.path, threads) if config.stream.adapt_after else None
        self._switching = False  # the adapted model is ready: the pipeline drains, then the model is switched
        self._repicked_for: str | None = None  # the fixed session whose provisional picks were sent back
        adapted = self.adapter.done_bundle() if self.adapter else None
        if adapted is not None:  # adapted by an earlier run: keep the adapted model
            encoder = self._open_encoder(adapted, encoder)
            self._repick_old(model_id(adapted))
        self.encoder = encoder
        bundle = encoder.bundle.path if encoder is not None else bundle_path(config.model.bundle, config.model.precision) if client else None
        self.model = model_id(bundle) if bundle is not None else None  # recorded with every pick
        session_file = self.adapter.folder / SESSION_FILE if adapted is not None else out / SESSION_FILE
        if client is not None:  # a Dask cluster picks; this process discovers, gates and records
            from emmae.runtime.distributed import ClusterPipeline

            self.pipeline = ClusterPipeline(config, client, out, self.output_stem, config.stream.queue_depth, self.wake.set, session_file)
        else:
            session = StreamSession(config, encoder, session_file)  # fitted on the first micrographs, kept across restarts
            self.pipeline = Pipeline(config, encoder, self._write_outputs, config.stream.queue_depth, on_done=self.wake.set, session=session)
        self.on_picked: Callable[[Path, int], None] | None = None  # (micrograph, particles), e.g. for benches
        self._ready: deque[Job] = deque()  # passed the gate, waiting for room in the pipeline
        self._queued: set[str] = set()  # keys ready or in the pipeline
        self._retry_after: dict[str, float] = {}  # keys whose outputs could not be written
        self._last_scan, self._scan_cost_s = -float("inf"), 0.0
        self._picked: dict[str, Entry] = {e.path: e for e in self.journal.picked()}  # skipped by key: no stat, no query
        self._failed_keys: set[str] = {e.path for e in self.journal.failed()}
        self.progress.failed = len(self._failed_keys)  # the status line's count is the journal's
        self._touched: set[str] = set()  # keys the observer reported changed (its thread adds, this one takes)
        self._touched_lock = threading.Lock()
        self._adopted: list[tuple[str, int, int, int]] = []  # picked entries of an older journal, with their file's stat
        self._known: dict[str, tuple[str, tuple[int, int]]] = {}  # key -> ('seen' | 'failed', (size, mtime_ns)) as last looked at
        self._sweep_at, self._sweep_cost_s = -float("inf"), 0.0  # every picked file is checked for replacement then
        self._index_stale, self._index_written, self._index_cost_s = True, -float("inf"), 0.0  # rewritten at start
        self._missing: set[str] = set()  # folders found gone (warned once)
        self._pace_at, self._pace_backlog = time.monotonic(), 0
        self._stop_file = _signature_of(self.watch / STOP_FILE)
        if self._stop_file is not None:
            log.warning("%s in %s is left from an earlier run: ignored (touch it again, or create it anew, to stop this daemon)",
                        STOP_FILE, self.watch)

    def step(self, stop: StopFlag) -> int:
        """Record finished micrographs, scan when due, look after the adaptation, feed the pipeline. Returns how many were picked."""
        picked = self.collect()
        if stop or self.stop_file_found(stop):
            return picked
        self.adapt()
        now = time.monotonic()
        spread_s = min(self._scan_cost_s / SCAN_SHARE, MAX_SCAN_INTERVAL_S)  # a huge folder is scanned less often: scans cost ~SCAN_SHARE of a core
        due = now - self._last_scan >= max(self.config.stream.poll_interval_s, spread_s)
        woken = self.changed.is_set() and now - self._last_scan >= max(MIN_SCAN_INTERVAL_S, spread_s)
        if due or woken:
            self.changed.clear()
            self._last_scan = now
            self.scan()
            self._scan_cost_s = time.monotonic() - now
            self.check_pace(now)
        self.feed()
        return picked

    def key(self, path: Path | str) -> str:
        """The journal's key of a file: its path relative to the watched folder (absolute if outside it)."""
        text = str(path)
        if text.startswith(self._prefix):
            return journal_key(text[len(self._prefix):])
        text = os.path.abspath(text)
        return journal_key(text[len(self._abs_prefix):] if text.startswith(self._abs_prefix) else text)

    def scan(self) -> None:
        """Gate every wanted file; those complete join the ready queue, broken ones are recorded as failed.

        No per-file error stops the scan: a file that cannot be examined, named, read or
        sized is recorded as failed with its reason.
        """
        now = time.monotonic()
        self._check_folders()
        sweep = now >= self._sweep_at
        start = time.monotonic()
        try:
            with self.journal.batch():  # one transaction per scan, not one per file
                self._scan(sweep, now)
        except sqlite3.Error:
            self._known.clear()  # what this scan recorded was rolled back: look at everything again
            raise
        if sweep:
            self._sweep_cost_s = time.monotonic() - start
            self._sweep_at = time.monotonic() + max(SWEEP_INTERVAL_S, 20 * self._sweep_cost_s)

    def _scan(self, sweep: bool, now: float) -> None:
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        for path, name, stat in self._candidates(sweep, touched):
            key = self.key(path)
            try:
                self._gate_one(path, name, key, stat, now)
            except sqlite3.Error:
                raise  # the journal cannot be written (full disk): the loop waits and tries again
            except FileNotFoundError:
                self.gate.forget(path)  # gone meanwhile
            except (MicrographError, ConfigError) as exc:
                stat = _any_stat(path)
                reason = exc.reason if isinstance(exc, MicrographError) else str(exc)
                self._failed(key, self._name(path, name), reason, stat and stat.st_size, stat and stat.st_mtime_ns, failure_kind(exc))
            except Exception as exc:  # noqa: BLE001 - no per-file error stops the daemon
                log.exception("unexpected error looking at %s", shown(key))
                stat = _any_stat(path)
                self._failed(key, self._name(path, name), f"unexpected error: {exc!r}", stat and stat.st_size, stat and stat.st_mtime_ns, "unexpected")
        self.journal.adopt(self._adopted)
        self._adopted.clear()

    def _name(self, path: Path, name: str | None) -> str:
        return name if name is not None else micrograph_name(path, self.config.output)

    def _gate_one(self, path: Path, name: str | None, key: str, stat: os.stat_result | None, now: float) -> None:
        """One file's turn in a scan (``stat``: from this scan, or None). Raises MicrographError or ConfigError for a file that will not do."""
        if key in self._queued or self._retry_after.get(key, 0.0) > now:
            return
        stat = stat if stat is not None else _any_stat(path)
        if stat is None:
            self.gate.forget(path)
            self._known.pop(key, None)
            return
        known = self._known.get(key)
        if known is not None and known[1] == (stat.st_size, stat.st_mtime_ns) and key not in self._picked:
            if known[0] == "failed":
                return  # failed, unchanged: no query, no read
        else:  # new this session, or changed: the name, the journal, the file's kind
            if key in self._picked and not self._replaced(key, path, name, stat):
                return  # picked, and still the version that was picked
            name = self._name(path, name)
            unsafe = unsafe_name(self.key_text(path), name)
            if unsafe:
                raise UnsafeNameError(path, unsafe)
            if key not in self._picked and not self.journal.wants(key, stat.st_size, stat.st_mtime_ns, stat.st_ino):
                self._known[key] = ("failed", (stat.st_size, stat.st_mtime_ns))
                return
            stat_regular(path)  # a symlink loop, a FIFO or a device: failed, never opened
            self.journal.mark_seen(key, name)
            self._known[key] = ("seen", (stat.st_size, stat.st_mtime_ns))
        if self.gate.check(path, stat=stat) != "ready":
            return
        stat = stat_regular(path)
        if stat is None:
            return
        self._known.pop(key, None)
        job = Job(Path(path), self._name(path, name), stat.st_size, stat.st_mtime_ns, time.time(), stat.st_ctime_ns, stat.st_ino)
        check_job(job, self.config)  # sizes before any work: nothing is allocated for a micrograph that cannot hold particles
        self._ready.append(job)
        self._queued.add(key)

    def key_text(self, path: Path) -> str:
        """The file's path relative to the watched folder as the file system gives it (may hold undecodable bytes)."""
        text = str(path)
        return text[len(self._prefix):] if text.startswith(self._prefix) else text

    def _replaced(self, key: str, path: Path, name: str | None, stat: os.stat_result) -> bool:
        """A picked file that changed since (replaced, rewritten, truncated): its outputs go, and it is picked again."""
        entry = self._picked[key]
        if entry.size is None:  # picked by an older version: this is the version it picked (recorded after the scan)
            self._adopted.append((key, stat.st_size, stat.st_mtime_ns, stat.st_ino))
            self._picked[key] = replace(entry, size=stat.st_size, mtime_ns=stat.st_mtime_ns, ino=stat.st_ino)
            return False
        if not changed_since_picked(entry, stat.st_size, stat.st_mtime_ns, stat.st_ino):
            return False
        removed = self._remove_outputs(entry)
        log.warning("%s changed since it was picked (replaced or rewritten): picking it again%s", shown(key),
                    f"; its {removed} old output files are removed" if removed else "")
        self.journal.mark_unstarted(key, self._name(path, name))
        del self._picked[key]
        self._index_stale = True
        return True

    def _remove_outputs(self, entry: Entry) -> int:
        if not entry.outputs or not entry.outputs.endswith("_autopick.star"):
            return 0
        stem = entry.outputs[: -len("_autopick.star")]
        removed = 0
        for suffix in OUTPUT_SUFFIXES:
            try:
                os.unlink(stem + suffix)
                removed += 1
            except OSError:
                pass
        return removed

    def feed(self) -> None:
        """Move ready micrographs into the pipeline while it has room (back-pressure); none while the model is switched."""
        while self._ready and self.pipeline.has_room() and not self._switching:
            job = self._ready[0]
            self.journal.mark_processing(self.key(job.path), job.name)
            self.pipeline.submit(self._ready.popleft())

    def collect(self, results: list[Done] | None = None) -> int:
        """Record finished micrographs in the journal; rewrite the index if due (at most once per ``INDEX_INTERVAL_S``)."""
        results = self.pipeline.collect() if results is None else results
        self._queued.difference_update(self.key(done.job.path) for done in results)  # rescanned if recording fails
        picked = sum(self._record(done) for done in results)
        self._repick_provisional()
        self._index_stale |= picked > 0
        interval = max(INDEX_INTERVAL_S, 10 * self._index_cost_s)  # the index costs at most ~10 % of this thread
        if self._index_stale and time.monotonic() - self._index_written >= interval:
            try:
                self.write_index()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the index stays stale and is tried again
                self._index_written = time.monotonic()
                log.error("cannot rewrite the session index: %s", exc)
        return picked

    def close(self, stop: StopFlag) -> None:
        """Stop the pipeline: roll back what has not started if stopping, else let it finish; record the rest."""
        if stop:
            self.pipeline.cancel()
        self.collect(self.pipeline.close())
        if self.adapter is not None:
            self.adapter.stop()  # resumed at the next start

    def release(self) -> None:
        """Close the journal and free the output folder for another daemon."""
        self.journal.close()
        self._lock.close()

    @property
    def queued(self) -> int:
        return len(self._ready) + self.pipeline.in_flight

    def _record(self, done: Done) -> int:
        job, key = done.job, self.key(done.job.path)
        if done.rolled_back:
            self.journal.mark_unstarted(key, job.name)
            return 0
        self._retry_after.pop(key, None)  # this attempt is over: only a new output failure waits again
        if done.changed or (done.error is None and not unchanged(job)):
            log.warning("%s changed while it was picked: looking at it again once it is stable", shown(key))
            self.journal.mark_unstarted(key, job.name)
            return 0
        if done.error is not None:
            if done.output_error:  # not the micrograph's fault: retried later, and at the next start
                self._retry_after[key] = time.monotonic() + OUTPUT_RETRY_S
                self._failed(key, job.name, done.error, None, None, "output")
            else:
                self._failed(key, job.name, done.error, job.size, job.mtime_ns, done.kind)
            return 0
        result = done.picks
        timings = {**result.timings_s, "latency": done.latency_s}
        outputs = str(self.out / f"{self.output_stem(job)}_autopick.star")
        session = (result.session or {}).get("id")
        self.journal.mark_picked(key, job.name, len(result), outputs, timings, job.size, job.mtime_ns, job.ino, self.model, session)
        self._picked[key] = Entry(key, job.name, "picked", job.size, job.mtime_ns, len(result), outputs, None, None, self.config_hash, job.ino,
                                  self.model)
        if key in self._failed_keys:
            self._failed_keys.discard(key)
            self.progress.failed = len(self._failed_keys)
        self.progress.picked(len(result), done.latency_s)
        if self.on_picked is not None:
            self.on_picked(job.path, len(result))
        figures = "" if self.status is not None else f" | {self.summary()}"  # live: the status line shows them
        log.info("picked %s: %d particles, on disk %.2f s after it was complete%s", shown(key), len(result), done.latency_s, figures)
        return 1

    def _failed(self, key: str, name: str, reason: str, size: int | None, mtime_ns: int | None, kind: str = "micrograph") -> None:
        self.journal.mark_failed(key, journal_key(name), journal_key(reason), size, mtime_ns, kind)
        if size is not None and mtime_ns is not None and kind != "output":
            self._known[key] = ("failed", (size, mtime_ns))  # not looked at again until it changes
        self._failed_keys.add(key)
        self.progress.failed = len(self._failed_keys)
        retry = {"config": "; tried again when the configuration changes", "output": f"; tried again in {OUTPUT_RETRY_S:g} s",
                 "unexpected": "; tried again when it or the configuration changes"}.get(kind, "; tried again if it changes")
        log.error("failed %s: %s%s", shown(key), reason, retry)

    def summary(self) -> str:
        adapting = self.adapter.status() if self.adapter is not None else ""
        return self.progress.summary(self.queued, self.gate.pending) + (f" | {adapting}" if adapting else "")

    def check_pace(self, now: float) -> bool:
        """Warn (at most once per ``PACE_INTERVAL_S``) when the micrographs waiting to be picked keep piling up."""
        if now - self._pace_at < PACE_INTERVAL_S:
            return False
        backlog, before = self.queued, self._pace_backlog
        self._pace_at, self._pace_backlog = now, backlog
        if backlog > self.config.stream.queue_depth and backlog > before:
            log.warning("falling behind the acquisition: %d micrographs wait to be picked (%d %.0f s ago); picking %.0f per hour",
                        backlog, before, PACE_INTERVAL_S, self.progress.rate_per_hour())
            return True
        return False

    def output_stem(self, job: Job) -> str:
        """Outputs mirror the micrograph's place below the watched folder; from a STAR, under its name when relative."""
        if self.watch_star is None:
            return str(Path(self.key_text(job.path)).with_suffix(""))
        rel = Path(job.name)
        if rel.is_absolute() or ".." in rel.parts:
            try:
                rel = job.path.relative_to(self.watch)
            except ValueError:
                rel = Path(job.path.name)
        return str(rel.with_suffix(""))

    def _write_outputs(self, job: Job, result: Picks) -> None:
        """The pipeline's last stage (its own thread): the micrograph's files, atomically."""
        stem = self.output_stem(job)
        (self.out / stem).parent.mkdir(parents=True, exist_ok=True)
        write_outputs(self.out, stem, result, self.config, job.path)

    def _repick_provisional(self) -> None:
        """Once the stream's session is fixed, what provisional sessions picked goes back to be picked with it (once per fixed session)."""
        frozen = getattr(self.pipeline.session, "frozen", None)
        if frozen is None or not self.config.stream.repick_provisional or frozen.digest() == self._repicked_for:
            return
        self._repicked_for = frozen.digest()
        again = self.journal.unpick_other_sessions(self._repicked_for, self.model)
        self._forget_picked(again)
        if again:
            self._last_scan = -float("inf")
            log.info("session %s fixed: the %d micrographs picked with a provisional session are picked again with it",
                     self._repicked_for, len(again))

    def adapt(self) -> None:
        """Start the adaptation when N micrographs are picked; once its model is ready and the pipeline drained, switch to it."""
        if self.adapter is None:
            return
        if self.adapter.poll() == "ready":
            self._switching = True
        elif not self._switching and self.adapter.due(len(self._picked)):
            first = [self._path_of(entry.path) for entry in self.journal.picked()[: self.config.stream.adapt_after]]
            self.adapter.start([str(path) for path in first])
        if self._switching and self.pipeline.in_flight == 0:
            self._switch()

    def _switch(self) -> None:
        """Pick with the adapted model from now on: its own session (fitted on the adaptation's micrographs), and re-pick (or only mark) the old model's picks."""
        bundle = self.adapter.bundle
        encoder = self._open_encoder(bundle, self.encoder)
        session = StreamSession(self.config, encoder, self.adapter.folder / SESSION_FILE)
        record = self.adapter.record
        for path in (record.micrographs if record else [])[: self.config.cluster.session_micrographs]:
            try:
                session.learn(prepare(Path(path), self.config, encoder))
            except (EmmaeError, OSError) as exc:
                log.warning("%s left out of the adapted model's session: %s", shown(path), exc)
        self.pipeline.close()
        self.pipeline = Pipeline(self.config, encoder, self._write_outputs, self.config.stream.queue_depth, on_done=self.wake.set, session=session)
        self.encoder, self.model = encoder, model_id(bundle)
        with self.journal.batch():
            self.adapter.finish(self.model)
            again = self._repick_old(self.model)
        self._forget_picked(again)
        self._switching, self._last_scan, self._index_stale = False, -float("inf"), True
        log.info("switched to the adapted model %s%s", self.model,
                 f"; the {len(again)} micrographs the old model picked are picked again" if again else "")

    def _forget_picked(self, keys: list[str]) -> None:
        """``keys``, sent back to ``seen`` in the journal, are no longer counted as picked (the next scan queues them)."""
        for key in keys:
            entry = self._picked.pop(key, None)
            if entry is not None:
                self.progress.unpicked(entry.particles or 0)

    def _repick_old(self, model: str) -> list[str]:
        """With ``adapt_then = repick``: what another model picked goes back to the queue (its outputs are overwritten later). Returns their keys."""
        if self.config.stream.adapt_then != "repick":
            return []
        return self.journal.unpick_other_models(model)

    def _open_encoder(self, bundle: Path, like: Encoder) -> Encoder:
        return Encoder.open(bundle, "fp32", like.backend, like.batch_tiles, self.threads)

    def _path_of(self, key: str) -> Path:
        return Path(key) if os.path.isabs(key) else self.watch / key

    def notice_change(self) -> None:
        """Called by the file-system observer (its thread): scan soon."""
        self.changed.set()
        self.wake.set()

    def notice_path(self, path: str) -> None:
        """Called by the file-system observer (its thread) with a changed file: looked at even if picked (it may be a new version)."""
        if path.startswith(self._real_root + "/"):
            with self._touched_lock:
                self._touched.add(journal_key(path[len(self._real_root) + 1 :]))

    def stop_file_found(self, stop: StopFlag) -> bool:
        """A stop file created (or touched) since the start; one left by an earlier run was reported and is ignored."""
        found = _signature_of(self.watch / STOP_FILE)
        if found is None or found == self._stop_file:
            if found is None:
                self._stop_file = None
            return False
        stop.reason = STOP_FILE
        log.info("stop file found: stopping")
        try:
            (self.watch / STOP_FILE).unlink()
        except OSError as exc:
            log.warning("cannot remove %s (%s): remove it, or the next start reports it", self.watch / STOP_FILE, exc.strerror)
        return True

    def _check_folders(self) -> None:
        """Warn once when the watched or the output folder disappears (and once when it is back)."""
        for what, folder, present in (("watched", self.watch, self.watch.is_dir()),
                                      ("output", self.out, self.out.is_dir() and self.journal.path.exists())):
            key = str(folder)
            if not present and key not in self._missing:
                self._missing.add(key)
                if what == "output":
                    log.warning("the output folder %s (or its journal) was deleted: new outputs are written there again, "
                                "but the record of this session is lost at exit; restart the daemon", folder)
                else:
                    log.warning("the watched folder %s is gone: waiting for it to come back", folder)
                self._index_stale = True
            elif present and key in self._missing:
                self._missing.discard(key)
                log.warning("the %s folder %s is back", what, folder)

    def _candidates(self, sweep: bool = False, touched: Container[str] = frozenset()) -> list[tuple[Path, str | None, os.stat_result | None]]:
        """(file, output name or None for "from the path", stat or None) to look at: not picked (or, on a sweep or when
        ``touched`` by an observer's event, picked ones too); a folder's files oldest first (``stream.order``)."""
        if self.watch_star is not None:
            rows = self._star_rows()
            return [(path, name, None) for path, name in rows if sweep or (key := self.key(path)) not in self._picked or key in touched]
        known: Container[str] = frozenset() if sweep else _Without(self._picked, touched)
        files = [(path, None, _any_stat(path)) for path in walk(self.watch, self.config.stream.patterns, self.config.stream.recursive,
                                                                  skip=self.out.resolve(), known=known, prefix=self._prefix)]
        newest = self.config.stream.order == "newest"
        files.sort(key=lambda f: f[2].st_mtime_ns if f[2] is not None else 0, reverse=newest)  # stable: by name within a time
        return files  # type: ignore[return-value]  # paths as strings: a Path each would cost more than the look itself

    def _star_rows(self) -> list[tuple[Path, str]]:
        try:
            return micrographs_from_star(self.watch_star, self.config.output.project_root)
        except (OSError, ValueError) as exc:  # absent yet, or caught mid-write by the upstream job
            log.debug("cannot read %s yet: %s", self.watch_star, exc)
            return []

    def write_index(self) -> None:
        """The session's RELION index of every micrograph picked so far whose outputs are on disk (atomic; O(picked), hence rate-limited)."""
        start = time.monotonic()
        rows = [(e.name, e.outputs or "") for e in self.journal.picked()
                if not unsafe_name("", e.name) and (not e.outputs or os.path.exists(e.outputs))]
        write_index(self.out / "autopick.star", rows)
        self._index_stale, self._index_written = False, time.monotonic()
        self._index_cost_s = self._index_written - start

    def write_failed(self) -> Path:
        """``failed.txt`` in the output folder (atomic): each failed micrograph, the kind of cause and the reason, tab-separated."""
        lines = ["# micrograph\tkind\treason"]
        lines += [f"{shown(e.path)}\t{e.kind or 'micrograph'}\t{shown(e.reason or '')}" for e in self.journal.failed()]
        path = self.out / FAILED_FILE
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
        return path

    def backlog_done(self) -> bool:
        """Nothing in the pipeline or ready, and no file in the folder still waiting (for ``--once``)."""
        now = time.monotonic()
        if self.adapter is not None and (self._switching or self.adapter.busy() or self.adapter.due(len(self._picked))):
            return False  # the adaptation (and the re-picks it brings) are part of the backlog
        return not self.queued and all(not self._wanted(path, now) for path, _, _ in self._candidates())

    def _wanted(self, path: Path, now: float) -> bool:
        """The file still needs looking at (not queued, not waiting out a retry, not done, not failed unchanged)."""
        key = self.key(path)
        if key in self._queued or self._retry_after.get(key, 0.0) > now:
            return False
        stat = _any_stat(path)
        if stat is None:
            return False
        if key in self._picked:
            return changed_since_picked(self._picked[key], stat.st_size, stat.st_mtime_ns, stat.st_ino)
        return self.journal.wants(key, stat.st_size, stat.st_mtime_ns, stat.st_ino)


class _Without:
    """``key in picked and key not in touched``, without building a set (picked can be large)."""

    def __init__(self, picked: Container[str], touched: Container[str]) -> None:
        self.picked, self.touched = picked, touched

    def __contains__(self, key: object) -> bool:
        return key in self.picked and key not in self.touched


def config_hash(config: EmmaeConfig) -> str:
    """A short hash of what decides a micrograph's picks (every section but the daemon's own and the device)."""
    data = config.model_dump(mode="json", exclude={"stream", "backend"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def unsafe_name(relative: str, name: str) -> str:
    """Why a file's name cannot be written safely (to the journal, a STAR file, a log line), or ''."""
    for text in (relative, name):
        if text.isprintable() and not any(c in text for c in UNSAFE_CHARACTERS):
            continue  # the common case, without a look at each character
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "its name is not valid UTF-8; rename the file"
        bad = sorted({c for c in text if not c.isprintable() or c in UNSAFE_CHARACTERS})
        if bad:
            listed = ", ".join(repr(c) for c in bad)
            return f"its name holds characters a STAR file cannot carry ({listed}); rename the file"
    if name.lower().startswith(STAR_RESERVED):
        return f"its name starts with a STAR keyword ({name.split('_')[0]}_); rename the file or set output.add_prefix"
    return ""


def shown(text: str) -> str:
    """``text`` for a log line or a tab-separated file: control characters and undecodable bytes escaped."""
    text = journal_key(text)
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _write_test(folder: Path) -> None:
    """Write ``WRITE_TEST_BYTES`` to a temporary file in ``folder`` and remove it. Raises OSError (read-only, full)."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(bytes(WRITE_TEST_BYTES))
    finally:
        os.unlink(name)


def _signature_of(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino


def _any_stat(path: Path) -> os.stat_result | None:
    """The file's stat, or the link's own when it cannot be followed (a loop); None if gone."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        try:
            return os.lstat(path)
        except OSError:
            return None


def run(session: Session, stop: StopFlag, once: bool, until: Callable[[], bool] | None = None) -> None:
    """Scan, feed and record until stopped (with ``once``: until the backlog is picked, once ``until()`` holds).

    The loop wakes every poll interval, when a micrograph finishes, and when the
    file-system observer reports a change (scans are then at most 4 a second).
    """
    stream = session.config.stream
    observer = None
    if wants_observer(session.watch, stream.poll):
        observer = start_observer(session.watch, stream.recursive, session.notice_change, ignore=session.out.resolve(),
                                  on_path=session.notice_path)
    try:
        _loop(session, stop, once, until)
    finally:
        if observer is not None:
            observer.stop()
        session.close(stop)
        if session.status is not None:
            session.status.show(session.summary())  # the final figures stay on screen
            session.status.finish()
    try:
        session.write_index()
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the journal has every pick; a restart rewrites it
        log.error("cannot rewrite the session index at exit: %s (the journal has every pick; a restart rewrites it)", exc)
    report_failed(session)
    log.info("journal: %s", session.journal.counts())


def report_failed(session: Session) -> None:
    """The final summary of failures: each failed micrograph with its reason, also written to ``failed.txt``."""
    failed = session.journal.failed()
    try:
        path = session.write_failed()
    except OutputError as exc:
        log.error("cannot write the list of failed micrographs: %s", exc)
        path = None
    if not failed:
        return
    log.warning("%d micrographs failed%s:", len(failed), f" (listed in {path})" if path else "")
    for entry in failed[:FAILED_SHOWN]:
        log.warning("  %s: %s", shown(entry.path), shown(entry.reason or ""))
    if len(failed) > FAILED_SHOWN:
        log.warning("  ... and %d more", len(failed) - FAILED_SHOWN)


def _loop(session: Session, stop: StopFlag, once: bool, until: Callable[[], bool] | None) -> None:
    poll = min(session.config.stream.poll_interval_s, 1.0)  # the status line ticks at least once a second
    while True:
        try:
            session.step(stop)
        except sqlite3.OperationalError as exc:  # e.g. a full disk; what was not recorded is redone, nothing is lost
            log.error("cannot write the journal (%s): trying again in %g s", exc, JOURNAL_RETRY_S)
            time.sleep(JOURNAL_RETRY_S)
            continue
        if stop or (once and (until is None or until()) and session.backlog_done()):
            return
        if session.status is not None:
            session.status.show(session.summary())
        session.wake.wait(poll)
        session.wake.clear()


def setup_logging(progress: str, level: int = logging.INFO) -> StatusLine | None:
    """Log to stderr at ``level``; with a live display, under a status line redrawn in place (returned)."""
    live = progress == "live" or (progress == "auto" and sys.stderr.isatty())
    handler = StatusLine(sys.stderr) if live else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger().setLevel(level)
    return handler if live else None


def open_encoder(config: EmmaeConfig, threads: int | None) -> Encoder:
    """The configured bundle on the configured device, ``model.batch_tiles`` tiles per run."""
    return Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device), config.model.batch_tiles, threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-stream", description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch", type=Path, help="folder where micrographs land")
    parser.add_argument("--watch-star", type=Path, help="follow an upstream micrographs STAR (e.g. corrected_micrographs.star) instead; names kept verbatim")
    parser.add_argument("--demo", action="store_true", help="simulate a session in a temporary folder and pick it live")
    parser.add_argument("--demo-count", type=int, default=12, help="micrographs in the demo (default 12)")
    parser.add_argument("--demo-per-hour", type=float, default=1200, help="acquisition rate of the demo (default 1200/h)")
    parser.add_argument("--diameter-px", type=float, metavar="PX", help="particle diameter in pixels of the micrographs")
    parser.add_argument("--diameter-A", type=float, metavar="A",
                        help="particle diameter in Angstrom (pixel size from each header, or --pixel-size-A)")
    parser.add_argument("--model", type=Path, help="model bundle (default: the bundled model)")
    parser.add_argument("--batch-tiles", type=int, metavar="N",
                        help="64x64 tiles the encoder takes per run (default 256, a whole 1024-px grid); lower it when memory is short")
    parser.add_argument("--once", action="store_true", help="pick the backlog, then exit")
    parser.add_argument("--preview", action="store_true", help="also write <stem>_preview.png with the picks circled")
    parser.add_argument("--settle-s", type=float, help="seconds a file must stay unchanged (default 5)")
    parser.add_argument("--poll-interval-s", type=float, help="seconds between scans (default 2)")
    parser.add_argument("--stale-after-s", type=float,
                        help="seconds an incomplete file may stay unchanged before it is recorded as failed (default 180)")
    parser.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                        help="live: a status line redrawn under the log; plain: log lines only; auto (default): live on a terminal")
    parser.add_argument("--poll", action="store_true", help="polling only (automatic on NFS/SMB/CIFS, where no change events arrive)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="pick on the Dask cluster of this scheduler (needs the dask extra; the watched and output folders must be shared "
                             "with its workers); this process keeps discovery, the completeness gate and the journal")
    adapt = parser.add_argument_group("adaptation (needs the train extra: torch)")
    adapt.add_argument("--adapt", type=int, metavar="N",
                       help="once N micrographs are picked, fine-tune the model on them in a separate process (no labels), then pick with it")
    adapt.add_argument("--adapt-then", choices=("repick", "mark"),
                       help="what the old model picked: picked again with the adapted model (repick, default) or left, marked in the journal")
    adapt.add_argument("--adapt-epochs", type=int, metavar="N", help="most fine-tuning epochs (default 5)")
    adapt.add_argument("--adapt-budget-s", type=float, metavar="S", help="fine-tuning time budget in seconds (default 600)")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--out", type=Path, metavar="DIR", help="output folder (default: WATCH/emmae_picks)")
    add_output_arguments(parser, output)
    add_common_arguments(parser)
    add_config_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return config_from_args(args, {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("model", "bundle"): args.model and str(args.model), ("model", "batch_tiles"): args.batch_tiles, ("stream", "settle_s"): args.settle_s,
        ("stream", "poll_interval_s"): args.poll_interval_s, ("stream", "poll"): "always" if args.poll else None,
        ("stream", "stale_after_s"): args.stale_after_s, ("stream", "adapt_after"): args.adapt,
        ("stream", "adapt_then"): args.adapt_then, ("stream", "adapt_epochs"): args.adapt_epochs, ("stream", "adapt_budget_s"): args.adapt_budget_s,
        ("output", "preview"): args.preview or None, ("backend", "device"): args.device, **output_switches(args),
    })


def connect_cluster(scheduler: str | None, config: EmmaeConfig) -> object | None:
    """The Dask client of ``--scheduler`` with the encoder plugin registered (None without one).

    Raises:
        ConfigError: dask.distributed is missing, or combined with ``--adapt``.
    """
    if scheduler is None:
        return None
    if config.stream.adapt_after:
        raise ConfigError("--adapt and --scheduler cannot be combined: adapt in a single-process stream, or with emmae-adapt beforehand")
    try:
        from emmae.runtime import distributed
    except ImportError:
        raise ConfigError("--scheduler needs dask.distributed, which is not installed: pip install 'cryo-emmae[dask]'") from None
    client = distributed.connect(scheduler, None)
    distributed.register(client, config)
    return client


def check_diameter(config: EmmaeConfig) -> None:
    """Refuse to start without a usable particle diameter.

    Raises:
        ConfigError: neither ``--diameter-px`` nor ``--diameter-A`` (nor their
            ``preprocess.`` settings), or one that is not a positive number.
    """
    pre = config.preprocess
    if pre.diameter_px is None and pre.diameter_A is None:
        raise ConfigError("no particle diameter: give --diameter-px or --diameter-A (or set preprocess.diameter_px or preprocess.diameter_A)")
    for flag, value in (("--diameter-px", pre.diameter_px), ("--diameter-A", pre.diameter_A), ("--pixel-size-A", pre.pixel_size_A)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a positive number, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = setup_logging(args.progress, log_level(args))
    retain_freed_memory()
    if args.demo:
        return demo(args, argv, status)
    try:
        config = _config(args)
        check_diameter(config)  # before any micrograph is touched
        if config.stream.adapt_after:
            check_can_adapt()
        watch = args.watch or (args.watch_star.parent if args.watch_star else None)
        if watch is None or not watch.is_dir():
            raise EmmaeError(f"--watch needs an existing folder (or give --watch-star), got {watch}")
        check_threads(args.threads)
        client = connect_cluster(args.scheduler, config)
        encoder = open_encoder(config, args.threads) if client is None else None
        out = args.out or watch / "emmae_picks"
        session = Session(watch, out, config, encoder, args.watch_star, status, args.threads, client)
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        write_bytes_atomic(out / "emmae-config.json", json.dumps(config_record(config, sys.argv if argv is None else argv), indent=2).encode())
    except OutputError as exc:
        session.release()
        log.error("%s", exc)
        return 2
    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handle)
    try:
        run(session, stop, args.once)
    finally:
        session.release()
        if client is not None:
            client.close()
    return 0


def demo(args: argparse.Namespace, argv: list[str] | None, status: StatusLine | None) -> int:
    """Simulate an acquisition into a temporary folder and pick it live with the bundled model."""
    watch = Path(tempfile.mkdtemp(prefix="emmae-demo-"))
    out = args.out or watch / "emmae_picks"
    argv = [*(argv or []), "--watch", str(watch), "--out", str(out), "--diameter-A", str(DEMO_DIAMETER_A), "--settle-s", "1", "--poll-interval-s", "0.5"]
    demo_args = build_parser().parse_args([a for a in argv if a != "--demo"])
    acquisition = Acquisition(watch, args.demo_count, 3600.0 / args.demo_per_hour)
    log.info("demo: %d synthetic micrographs land in %s at %g per hour; picks go to %s", args.demo_count, watch, args.demo_per_hour, out)
    try:
        config = _config(demo_args)
        encoder = open_encoder(config, demo_args.threads)
        session = Session(watch, out, config, encoder, status=status)
    except (EmmaeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handle)
    acquisition.start()
    try:
        run(session, stop, once=True, until=acquisition.finished.is_set)
    finally:
        acquisition.cancelled.set()
        session.release()
    picked = Journal(out)
    entries = picked.picked()
    log.info("demo done: %d micrographs picked, %d particles; outputs in %s", len(entries), sum(e.particles or 0 for e in entries), out)
    picked.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
