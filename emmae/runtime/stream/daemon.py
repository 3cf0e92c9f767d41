"""``emmae-stream``: pick micrographs as they land, keep the model loaded, lose nothing.

    emmae-stream --watch /data/session --diameter-A 300 [--out DIR] [--once] [--settle-s 5]
    emmae-stream --demo                 # a simulated session picked live, no data needed

Scans (every ``stream.poll_interval_s``, sooner on a file-system event) find candidate
files; each is handed on once it is stable for ``stream.settle_s`` and passes the strict
MRC check. A pipeline of three threads joined by bounded queues (``stream.queue_depth``)
reads and preprocesses, picks with the model loaded once, and writes the outputs
atomically, so disk, CPU and accelerator overlap and memory stays bounded. Each result is
recorded in the SQLite journal and the session index ``autopick.star`` is rewritten
atomically. A bad micrograph is recorded with its reason and retried only if the file
changes; a micrograph whose outputs could not be written (a full disk) is retried after
30 s. SIGINT, SIGTERM or a file named ``EMMAE_STOP`` in the watched folder stop the
daemon after the micrograph in hand (those queued behind it are rolled back); ``--once``
picks the backlog and exits. Restarting resumes from the journal. Outputs mirror the
micrographs' sub-folders. One daemon per output folder (``emmae.lock``).
On a terminal a status line (rate, queue, last latency, particles) is redrawn under the log.
Exit status: 0 stopped cleanly, 2 bad arguments, configuration, model or a busy output folder.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from emmae.backend import get_backend
from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import EmmaeError, MicrographError, OutputError
from emmae.io.atomic import remove_stale_temporaries, write_bytes_atomic
from emmae.io.inputs import micrographs_from_star
from emmae.io.picks import micrograph_name, write_index
from emmae.memory import retain_freed_memory
from emmae.runtime.cli import write_outputs
from emmae.runtime.encoder import Encoder
from emmae.runtime.options import add_common_arguments, add_output_arguments, output_switches, plain_text
from emmae.runtime.picker import Picks
from emmae.runtime.stream.demo import DEMO_DIAMETER_A, Acquisition
from emmae.runtime.stream.gate import Gate, scan
from emmae.runtime.stream.journal import Journal
from emmae.runtime.stream.pipeline import Done, Job, Pipeline
from emmae.runtime.stream.status import Progress, StatusLine
from emmae.runtime.stream.watcher import start_observer, wants_observer

log = logging.getLogger("emmae.stream")
STOP_FILE = "EMMAE_STOP"
LOCK_FILE = "emmae.lock"
MIN_SCAN_INTERVAL_S = 0.25  # file-system events trigger scans no more often than this
INDEX_INTERVAL_S = 1.0  # the session index (every pick so far) is rewritten at most this often (more rarely when large), and at exit
JOURNAL_RETRY_S = 10.0  # after the journal could not be written
OUTPUT_RETRY_S = 30.0  # a micrograph whose outputs could not be written (full disk) is retried after this


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
    """

    def __init__(self, watch: Path, out: Path, config: EmmaeConfig, encoder: Encoder, watch_star: Path | None = None,
                 status: StatusLine | None = None) -> None:
        self.watch, self.out, self.config, self.watch_star, self.status = watch, out, config, watch_star, status
        out.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(out)
        stale = remove_stale_temporaries(out)
        if stale:
            log.info("removed %d temporary files left in %s by an interrupted run", len(stale), out)
        self.journal = Journal(out)
        self.gate = Gate(config.stream.settle_s)
        self.progress = Progress()
        self.wake = threading.Event()  # a result is ready, a file changed, or it is time to scan
        self.changed = threading.Event()  # set by the file-system observer
        self.pipeline = Pipeline(config, encoder, self._write_outputs, config.stream.queue_depth, on_done=self.wake.set)
        self.on_picked: Callable[[Path, int], None] | None = None  # (micrograph, particles), e.g. for benches
        self._ready: deque[Job] = deque()  # passed the gate, waiting for room in the pipeline
        self._queued: set[str] = set()  # paths ready or in the pipeline
        self._retry_after: dict[str, float] = {}  # paths whose outputs could not be written
        self._last_scan = -float("inf")
        self._picked: set[str] = {e.path for e in self.journal.picked()}  # never looked at again: no stat, no query
        self._index_stale, self._index_written, self._index_cost_s = bool(self._picked), -float("inf"), 0.0  # rewritten at start

    def step(self, stop: StopFlag) -> int:
        """Record finished micrographs, scan when due, feed the pipeline. Returns how many were picked."""
        picked = self.collect()
        if stop or self.stop_file_found(stop):
            return picked
        now = time.monotonic()
        if now - self._last_scan >= self.config.stream.poll_interval_s or (self.changed.is_set() and now - self._last_scan >= MIN_SCAN_INTERVAL_S):
            self.changed.clear()
            self._last_scan = now
            self.scan()
        self.feed()
        return picked

    def scan(self) -> None:
        """Gate every wanted file; those complete join the ready queue, broken ones are recorded as failed."""
        now = time.monotonic()
        for path, name in self._candidates():
            key, stat = str(path), self._wanted(path, now)
            if stat is None:
                continue
            self.journal.mark_seen(key, name)
            try:
                state = self.gate.check(path)
            except MicrographError as exc:
                self._failed(key, name, exc.reason, stat.st_size, stat.st_mtime_ns)
                continue
            if state == "ready":
                self._ready.append(Job(path, name, stat.st_size, stat.st_mtime_ns, time.time()))
                self._queued.add(key)

    def feed(self) -> None:
        """Move ready micrographs into the pipeline while it has room (back-pressure)."""
        while self._ready and self.pipeline.has_room():
            job = self._ready[0]
            self.journal.mark_processing(str(job.path), job.name)
            self.pipeline.submit(self._ready.popleft())

    def collect(self, results: list[Done] | None = None) -> int:
        """Record finished micrographs in the journal; rewrite the index if due (at most once per ``INDEX_INTERVAL_S``)."""
        results = self.pipeline.collect() if results is None else results
        self._queued.difference_update(str(done.job.path) for done in results)  # rescanned if recording fails
        picked = sum(self._record(done) for done in results)
        self._index_stale |= picked > 0
        interval = max(INDEX_INTERVAL_S, 10 * self._index_cost_s)  # the index costs at most ~10 % of this thread
        if self._index_stale and time.monotonic() - self._index_written >= interval:
            try:
                self.write_index()
            except OutputError as exc:  # e.g. a full disk: the index stays stale and is tried again
                self._index_written = time.monotonic()
                log.error("cannot rewrite the session index: %s", exc)
        return picked

    def close(self, stop: StopFlag) -> None:
        """Stop the pipeline: roll back what has not started if stopping, else let it finish; record the rest."""
        if stop:
            self.pipeline.cancel()
        self.collect(self.pipeline.close())

    def release(self) -> None:
        """Close the journal and free the output folder for another daemon."""
        self.journal.close()
        self._lock.close()

    @property
    def queued(self) -> int:
        return len(self._ready) + self.pipeline.in_flight

    def _record(self, done: Done) -> int:
        job, key = done.job, str(done.job.path)
        if done.rolled_back:
            self.journal.mark_unstarted(key, job.name)
            return 0
        self._retry_after.pop(key, None)  # this attempt is over: only a new output failure waits again
        if done.error is not None:
            if done.output_error:  # not the micrograph's fault: retried later, and at the next start
                self._retry_after[key] = time.monotonic() + OUTPUT_RETRY_S
                self._failed(key, job.name, done.error, None, None)
            else:
                self._failed(key, job.name, done.error, job.size, job.mtime_ns)
            return 0
        result = done.picks
        timings = {**result.timings_s, "latency": done.latency_s}
        self.journal.mark_picked(key, job.name, len(result), str(self.out / f"{self.output_stem(job)}_autopick.star"), timings)
        self._picked.add(key)
        self.progress.picked(len(result), done.latency_s)
        if self.on_picked is not None:
            self.on_picked(job.path, len(result))
        figures = "" if self.status is not None else f" | {self.summary()}"  # live: the status line shows them
        log.info("picked %s: %d particles, on disk %.2f s after it was complete%s", job.path.name, len(result), done.latency_s, figures)
        return 1

    def _failed(self, key: str, name: str, reason: str, size: int | None, mtime_ns: int | None) -> None:
        self.journal.mark_failed(key, name, reason, size, mtime_ns)
        self.progress.failed += 1
        log.error("failed %s", reason)

    def summary(self) -> str:
        return self.progress.summary(self.queued, self.gate.pending)

    def output_stem(self, job: Job) -> str:
        """Outputs mirror the micrograph's place: under its STAR name when relative, else its path below the watched folder."""
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

    def notice_change(self) -> None:
        """Called by the file-system observer (its thread): scan soon."""
        self.changed.set()
        self.wake.set()

    def stop_file_found(self, stop: StopFlag) -> bool:
        if (self.watch / STOP_FILE).exists():
            stop.reason = STOP_FILE
            log.info("stop file found: stopping")
            return True
        return False

    def _candidates(self) -> list[tuple[Path, str]]:
        """(file, output name) pairs not yet picked: the STAR's rows verbatim, or the folder's files."""
        if self.watch_star is not None:
            return [(path, name) for path, name in self._star_rows() if str(path) not in self._picked]
        files = list(scan(self.watch, self.config.stream.patterns, self.config.stream.recursive, skip=self.out.resolve(), known=self._picked))
        if self.config.stream.order == "newest":
            files.sort(key=lambda p: p.stat().st_mtime_ns if p.exists() else 0, reverse=True)
        return [(path, micrograph_name(path, self.config.output)) for path in files]

    def _star_rows(self) -> list[tuple[Path, str]]:
        try:
            return micrographs_from_star(self.watch_star, self.config.output.project_root)
        except (OSError, ValueError) as exc:  # absent yet, or caught mid-write by the upstream job
            log.debug("cannot read %s yet: %s", self.watch_star, exc)
            return []

    def write_index(self) -> None:
        """The session's RELION index of every micrograph picked so far (atomic; O(picked), hence rate-limited)."""
        start = time.monotonic()
        write_index(self.out / "autopick.star", [(e.name, e.outputs or "") for e in self.journal.picked()])
        self._index_stale, self._index_written = False, time.monotonic()
        self._index_cost_s = self._index_written - start

    def backlog_done(self) -> bool:
        """Nothing in the pipeline or ready, and no file in the folder still waiting (for ``--once``)."""
        now = time.monotonic()
        return not self.queued and all(self._wanted(path, now) is None for path, _ in self._candidates())

    def _wanted(self, path: Path, now: float) -> os.stat_result | None:
        """The file's stat if it still needs picking (not queued, not waiting out a retry, not done), else None."""
        key = str(path)
        if key in self._queued or self._retry_after.get(key, 0.0) > now:
            return None
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return stat if self.journal.wants(key, stat.st_size, stat.st_mtime_ns) else None


def run(session: Session, stop: StopFlag, once: bool, until: Callable[[], bool] | None = None) -> None:
    """Scan, feed and record until stopped (with ``once``: until the backlog is picked, once ``until()`` holds).

    The loop wakes every poll interval, when a micrograph finishes, and when the
    file-system observer reports a change (scans are then at most 4 a second).
    """
    stream = session.config.stream
    observer = None
    if wants_observer(session.watch, stream.poll):
        observer = start_observer(session.watch, stream.recursive, session.notice_change, ignore=session.out.resolve())
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
    except OutputError as exc:
        log.error("cannot rewrite the session index at exit: %s (the journal has every pick; a restart rewrites it)", exc)
    log.info("journal: %s", session.journal.counts())


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


def setup_logging(progress: str) -> StatusLine | None:
    """Log to stderr; with a live display, under a status line redrawn in place (returned)."""
    live = progress == "live" or (progress == "auto" and sys.stderr.isatty())
    handler = StatusLine(sys.stderr) if live else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return handler if live else None


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
    parser.add_argument("--once", action="store_true", help="pick the backlog, then exit")
    parser.add_argument("--preview", action="store_true", help="also write <stem>_preview.png with the picks circled")
    parser.add_argument("--settle-s", type=float, help="seconds a file must stay unchanged (default 5)")
    parser.add_argument("--poll-interval-s", type=float, help="seconds between scans (default 2)")
    parser.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                        help="live: a status line redrawn under the log; plain: log lines only; auto (default): live on a terminal")
    parser.add_argument("--poll", action="store_true", help="polling only (automatic on NFS/SMB/CIFS, where no change events arrive)")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--out", type=Path, metavar="DIR", help="output folder (default: WATCH/emmae_picks)")
    add_output_arguments(parser, output)
    add_common_arguments(parser, threads=False, verbosity=False)
    add_config_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return config_from_args(args, {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("model", "bundle"): args.model and str(args.model), ("stream", "settle_s"): args.settle_s,
        ("stream", "poll_interval_s"): args.poll_interval_s, ("stream", "poll"): "always" if args.poll else None,
        ("output", "preview"): args.preview or None, ("backend", "device"): args.device, **output_switches(args),
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = setup_logging(args.progress)
    retain_freed_memory()
    if args.demo:
        return demo(args, argv, status)
    try:
        config = _config(args)
        watch = args.watch or (args.watch_star.parent if args.watch_star else None)
        if watch is None or not watch.is_dir():
            raise EmmaeError(f"--watch needs an existing folder (or give --watch-star), got {watch}")
        encoder = Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device))
        out = args.out or watch / "emmae_picks"
        session = Session(watch, out, config, encoder, args.watch_star, status)
    except (EmmaeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    write_bytes_atomic(out / "emmae-config.json", json.dumps(config_record(config, sys.argv if argv is None else argv), indent=2).encode())
    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handle)
    try:
        run(session, stop, args.once)
    finally:
        session.release()
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
        encoder = Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device))
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
