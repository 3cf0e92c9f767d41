"""A simulated acquisition for ``emmae-stream --demo``: synthetic micrographs land in a folder
in chunks, at a microscope-like pace, while the daemon picks them."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from emmae.io.mrc import write_micrograph
from emmae.synth import SynthParams, make_micrograph

log = logging.getLogger("emmae.stream.demo")
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
