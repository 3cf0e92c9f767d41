"""``emmae-stream --demo``: a simulated session picked live, no data needed.

Synthetic micrographs (:mod:`emmae.synth`) land in a temporary folder in chunks, at a
microscope-like pace (:class:`Acquisition`), while a daemon picks them with the bundled
model; with ``--http`` the web view stays up afterwards until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import EmmaeError
from emmae.io.mrc import write_micrograph
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.stream.daemon import Daemon, StopFlag, run
from emmae.runtime.stream.journal import Journal
from emmae.runtime.stream.status import StatusLine
from emmae.runtime.web.live import serve_daemon
from emmae.runtime.web.server import ViewServer
from emmae.synth import SynthParams, make_micrograph

log = logging.getLogger("emmae.stream")
DEMO_PARAMS = SynthParams(shape=(1024, 1024), diameter_px=56.0, pixel_size_A=5.36, snr=0.2)
DEMO_DIAMETER_A = DEMO_PARAMS.diameter_px * DEMO_PARAMS.pixel_size_A
CHUNK_BYTES = 1 << 20


def write_in_chunks(source: bytes, target: Path, pause_s: float) -> None:
    """Write ``source`` to ``target`` piece by piece, as a detector or a copy would."""
    with open(target, "wb") as handle:
        for start in range(0, len(source), CHUNK_BYTES):
            handle.write(source[start : start + CHUNK_BYTES])
            handle.flush()
            time.sleep(pause_s)


class Acquisition(threading.Thread):
    """Writes ``count`` synthetic micrographs into ``folder``, one every ``interval_s``."""

    def __init__(self, folder: Path, count: int, interval_s: float, seed: int = 0) -> None:
        super().__init__(name="demo-acquisition", daemon=True)
        self.folder, self.count, self.interval_s, self.seed = folder, count, interval_s, seed
        self.finished = threading.Event()
        self.cancelled = threading.Event()

    def run(self) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            for i in range(self.count):
                if self.cancelled.is_set():
                    break
                start = time.monotonic()
                staged = Path(scratch) / "staged.mrc"
                write_micrograph(staged, make_micrograph(DEMO_PARAMS, seed=self.seed + i).image, DEMO_PARAMS.pixel_size_A)
                write_in_chunks(staged.read_bytes(), self.folder / f"demo_{i:05d}.mrc", pause_s=0.05)
                log.info("acquired demo_%05d.mrc", i)
                self.cancelled.wait(max(0.0, self.interval_s - (time.monotonic() - start)))
        self.finished.set()


def run_demo(args: argparse.Namespace, argv: list[str] | None, status: StatusLine | None, stop: StopFlag,
             configure: Callable[[list[str]], tuple[argparse.Namespace, EmmaeConfig]]) -> int:
    """Simulate an acquisition into a temporary folder and pick it live with the bundled model. ``configure``: the
    stream command's options and configuration for an argument list (the demo's folders and settings added to the user's).

    Raises:
        EmmaeError, FileNotFoundError: the configuration, the model or the web view's address will not do.
    """
    watch = Path(tempfile.mkdtemp(prefix="emmae-demo-"))
    out = args.out or watch / "emmae_picks"
    argv = [*(sys.argv[1:] if argv is None else argv), "--watch", str(watch), "--out", str(out), "--diameter-A", str(DEMO_DIAMETER_A),
            "--settle-s", "1", "--poll-interval-s", "0.5"]
    acquisition = Acquisition(watch, args.demo_count, 3600.0 / args.demo_per_hour)
    log.info("demo: %d synthetic micrographs land in %s at %g per hour; picks go to %s", args.demo_count, watch, args.demo_per_hour, out)
    demo_args, config = configure([a for a in argv if a != "--demo"])
    encoder = Encoder.configured(config, demo_args.threads)
    daemon = Daemon(watch, out, config, encoder, status=status, stop=stop)
    try:
        server = None if args.http is None else serve_daemon(daemon, args.http, args.http_token)
    except EmmaeError:
        daemon.release()
        raise
    acquisition.start()
    try:
        run(daemon, stop, once=True, until=acquisition.finished.is_set)
    finally:
        acquisition.cancelled.set()
        if server is not None:
            server.view.live = None  # from now on the journal's figures
        daemon.release()
    picked = Journal(out)
    entries = picked.picked()
    log.info("demo done: %d micrographs picked, %d particles; outputs in %s", len(entries), sum(e.particles or 0 for e in entries), out)
    picked.close()
    if server is not None:
        keep_serving(server, stop)
    return 0


def keep_serving(server: ViewServer, stop: StopFlag) -> None:
    """Serve the finished demo's page until SIGINT or SIGTERM (at once when one came during the demo)."""
    if not stop:
        log.info("the web view stays up at %s: press Ctrl-C to stop", server.url())
    while not stop:
        time.sleep(0.2)
    server.stop()
