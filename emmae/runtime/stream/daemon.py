"""``emmae-stream``: pick micrographs as they land, keep the model loaded, lose nothing.

    emmae-stream --watch /data/session --diameter-A 300 [--out DIR] [--once] [--settle-s 5]
    emmae-stream --demo                 # a simulated session picked live, no data needed

Each scan (every ``stream.poll_interval_s``) finds candidate files, waits until each
is stable for ``stream.settle_s`` and passes the strict MRC check, picks it with the
model loaded once, writes its outputs atomically, records it in the SQLite journal
and rewrites the session index ``autopick.star`` atomically. A failed micrograph is
recorded with its reason and retried only if the file changes. SIGINT, SIGTERM or a
file named ``EMMAE_STOP`` in the watched folder stop the daemon after the micrograph in
hand; ``--once`` picks the backlog and exits. Restarting resumes from the journal.
Exit status: 0 stopped cleanly, 2 bad arguments, configuration or model.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emmae.backend import get_backend
from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import EmmaeError, MicrographError
from emmae.io.atomic import write_bytes_atomic
from emmae.io.inputs import micrographs_from_star
from emmae.io.picks import micrograph_name, write_index
from emmae.memory import retain_freed_memory
from emmae.runtime.cli import write_outputs
from emmae.runtime.encoder import Encoder
from emmae.runtime.picker import pick_micrograph
from emmae.runtime.stream.demo import DEMO_DIAMETER_A, Acquisition
from emmae.runtime.stream.gate import Gate, scan
from emmae.runtime.stream.journal import Journal
from emmae.runtime.stream.watcher import start_observer, wants_observer

log = logging.getLogger("emmae.stream")
STOP_FILE = "EMMAE_STOP"


@dataclass
class StopFlag:
    """Set by a signal handler or the stop file; checked between micrographs."""

    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.reason)

    def handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        log.info("%s received: stopping after the micrograph in hand", self.reason)


class Progress:
    """Running figures for the log: micrographs per hour (last 20), waiting files, particles per micrograph."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=20)
        self.count = 0
        self.particles = 0

    def picked(self, particles: int) -> None:
        self.times.append(time.monotonic())
        self.count += 1
        self.particles += particles

    def summary(self, waiting: int) -> str:
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        rate = (len(self.times) - 1) / span * 3600 if span > 0 else 0.0
        return f"{self.count} picked, {rate:.0f}/h, {waiting} waiting, {self.particles / max(self.count, 1):.0f} particles per micrograph"


class Session:
    """One watched folder (or upstream micrographs STAR), its output folder, journal and gate."""

    def __init__(self, watch: Path, out: Path, config: EmmaeConfig, encoder: Encoder, watch_star: Path | None = None) -> None:
        self.watch, self.out, self.config, self.encoder, self.watch_star = watch, out, config, encoder, watch_star
        out.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(out)
        self.gate = Gate(config.stream.settle_s)
        self.progress = Progress()
        self.on_picked: Callable[[Path, int], None] | None = None  # (micrograph, particles), e.g. for benches

    def step(self, stop: StopFlag) -> int:
        """One scan: pick every file that became ready. Returns how many were picked."""
        picked = 0
        for path, name in self._candidates():
            if stop or self.stop_file_found(stop):
                break
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if not self.journal.wants(str(path), stat.st_size, stat.st_mtime_ns):
                continue
            self.journal.mark_seen(str(path), name)
            try:
                state = self.gate.check(path)
            except MicrographError as exc:
                self.journal.mark_failed(str(path), name, exc.reason, stat.st_size, stat.st_mtime_ns)
                log.error("failed %s", exc)
                continue
            if state == "ready":
                picked += self._pick(path, name, stat.st_size, stat.st_mtime_ns)
        return picked

    def stop_file_found(self, stop: StopFlag) -> bool:
        if (self.watch / STOP_FILE).exists():
            stop.reason = STOP_FILE
            log.info("stop file found: stopping")
            return True
        return False

    def _candidates(self) -> list[tuple[Path, str]]:
        """(file, output name) pairs: the STAR's rows verbatim, or the folder's files."""
        if self.watch_star is not None:
            return self._star_rows()
        files = list(scan(self.watch, self.config.stream.patterns, self.config.stream.recursive, skip=self.out.resolve()))
        if self.config.stream.order == "newest":
            files.sort(key=lambda p: p.stat().st_mtime_ns if p.exists() else 0, reverse=True)
        return [(path, micrograph_name(path, self.config.output)) for path in files]

    def _star_rows(self) -> list[tuple[Path, str]]:
        try:
            return micrographs_from_star(self.watch_star, self.config.output.project_root)
        except (OSError, ValueError) as exc:  # absent yet, or caught mid-write by the upstream job
            log.debug("cannot read %s yet: %s", self.watch_star, exc)
            return []

    def _pick(self, path: Path, name: str, size: int, mtime_ns: int) -> int:
        self.journal.mark_processing(str(path), name)
        try:
            result = pick_micrograph(path, self.config, self.encoder, name=name)
            stem = path.stem
            write_outputs(self.out, stem, result, self.config, path)
        except (MicrographError, EmmaeError) as exc:
            self.journal.mark_failed(str(path), name, str(exc), size, mtime_ns)
            log.error("failed %s", exc)
            return 0
        self.journal.mark_picked(str(path), name, len(result), str(self.out / f"{stem}_autopick.star"), result.timings_s)
        self.write_index()
        self.progress.picked(len(result))
        if self.on_picked is not None:
            self.on_picked(path, len(result))
        log.info("picked %s: %d particles in %.2f s | %s", path.name, len(result), sum(result.timings_s.values()), self.progress.summary(self.gate.pending))
        return 1

    def write_index(self) -> None:
        """The session's RELION index of every micrograph picked so far (atomic)."""
        write_index(self.out / "autopick.star", [(e.name, e.outputs or "") for e in self.journal.picked()])

    def backlog_done(self) -> bool:
        """No file in the folder is still waiting to be picked (for ``--once``)."""
        for path, _ in self._candidates():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if self.journal.wants(str(path), stat.st_size, stat.st_mtime_ns):
                return False
        return True


def run(session: Session, stop: StopFlag, once: bool, until: Callable[[], bool] | None = None) -> None:
    """Scan until stopped (with ``once``: until the backlog is picked, once ``until()`` holds).

    Scans run every poll interval, and sooner when the file-system observer reports a change.
    """
    stream = session.config.stream
    wake = threading.Event()
    observer = start_observer(session.watch, stream.recursive, wake) if wants_observer(session.watch, stream.poll) else None
    try:
        _loop(session, stop, once, until, wake)
    finally:
        if observer is not None:
            observer.stop()
    session.write_index()
    log.info("journal: %s", session.journal.counts())


def _loop(session: Session, stop: StopFlag, once: bool, until: Callable[[], bool] | None, wake: threading.Event) -> None:
    poll = session.config.stream.poll_interval_s
    while not stop and not session.stop_file_found(stop):
        session.step(stop)
        if once and (until is None or until()) and session.backlog_done():
            break
        wake.wait(poll)
        wake.clear()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-stream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch", type=Path, help="folder where micrographs land")
    parser.add_argument("--watch-star", type=Path, help="follow an upstream micrographs STAR (e.g. corrected_micrographs.star) instead; names kept verbatim")
    parser.add_argument("--demo", action="store_true", help="simulate a session in a temporary folder and pick it live")
    parser.add_argument("--demo-count", type=int, default=12, help="micrographs in the demo (default 12)")
    parser.add_argument("--demo-per-hour", type=float, default=1200, help="acquisition rate of the demo (default 1200/h)")
    parser.add_argument("--out", type=Path, help="output folder (default: WATCH/emmae_picks)")
    parser.add_argument("--diameter-px", type=float)
    parser.add_argument("--diameter-A", type=float)
    parser.add_argument("--model", type=Path, help="model bundle (default: the bundled model)")
    parser.add_argument("--once", action="store_true", help="pick the backlog, then exit")
    parser.add_argument("--preview", action="store_true", help="also write <stem>_preview.png with the picks circled")
    parser.add_argument("--settle-s", type=float, help="seconds a file must stay unchanged (default 5)")
    parser.add_argument("--poll-interval-s", type=float, help="seconds between scans (default 2)")
    parser.add_argument("--poll", action="store_true", help="polling only (automatic on NFS/SMB/CIFS, where no change events arrive)")
    add_config_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return config_from_args(args, {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("model", "bundle"): args.model and str(args.model), ("stream", "settle_s"): args.settle_s,
        ("stream", "poll_interval_s"): args.poll_interval_s, ("stream", "poll"): "always" if args.poll else None,
        ("output", "preview"): args.preview or None,
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    retain_freed_memory()
    if args.demo:
        return demo(args, argv)
    try:
        config = _config(args)
        watch = args.watch or (args.watch_star.parent if args.watch_star else None)
        if watch is None or not watch.is_dir():
            raise EmmaeError(f"--watch needs an existing folder (or give --watch-star), got {watch}")
        encoder = Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device))
        out = args.out or watch / "emmae_picks"
        session = Session(watch, out, config, encoder, args.watch_star)
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
        session.journal.close()
    return 0


def demo(args: argparse.Namespace, argv: list[str] | None) -> int:
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
        session = Session(watch, out, config, encoder)
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
        session.journal.close()
    picked = Journal(out)
    entries = picked.picked()
    log.info("demo done: %d micrographs picked, %d particles; outputs in %s", len(entries), sum(e.particles or 0 for e in entries), out)
    picked.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
