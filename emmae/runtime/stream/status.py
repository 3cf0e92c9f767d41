"""What the daemon shows while it runs: running figures, and a live status line on a terminal.

On a terminal the status line (micrographs per hour, queue, last latency, particles per
micrograph) is redrawn in place under the scrolling log; otherwise (a service, a pipe)
the same figures end every per-micrograph log line, and nothing is redrawn.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TextIO

RATE_WINDOW = 20  # the last this many events set a rate


def rate_per_hour(times: Iterable[float | None]) -> float | None:
    """Events per hour over the last ``RATE_WINDOW`` of ``times`` (seconds, any order; None skipped); None with fewer
    than two, or all at one time."""
    last = sorted(t for t in times if t is not None)[-RATE_WINDOW:]
    span_s = last[-1] - last[0] if len(last) > 1 else 0.0
    return (len(last) - 1) / span_s * 3600 if span_s > 0 else None


class Progress:
    """Running figures: micrographs per hour (last ``RATE_WINDOW`` picks), last latency, particles per micrograph."""

    def __init__(self, count: int = 0, particles: int = 0) -> None:
        """``count``, ``particles``: what earlier runs of the stream picked."""
        self.times: deque[float] = deque(maxlen=RATE_WINDOW)
        self.count = count
        self.failed = 0
        self.particles = particles
        self.last_latency_s: float | None = None

    def picked(self, particles: int, latency_s: float) -> None:
        self.times.append(time.monotonic())
        self.count += 1
        self.particles += particles
        self.last_latency_s = latency_s

    def repicked(self, before: int, particles: int, latency_s: float) -> None:
        """A micrograph counted as picked was picked again (a fixed session, an adapted model): its particles replace the old."""
        self.times.append(time.monotonic())
        self.particles += particles - before
        self.last_latency_s = latency_s

    def rate_per_hour(self) -> float:
        return rate_per_hour(self.times) or 0.0

    def summary(self, queued: int, settling: int, queue_depth: int | None = None) -> str:
        """The status line; with more than ``queue_depth`` micrographs queued it says how far behind the stream is."""
        latency = "-" if self.last_latency_s is None else f"{self.last_latency_s:.2f} s"
        behind = ""
        if queue_depth is not None and queued > queue_depth:
            behind = f" | BEHIND by {queued} micrographs" + (f", {catch_up_text(queued, self.rate_per_hour())}" if self.rate_per_hour() else "")
        return (
            f"{self.count} picked, {self.failed} failed | {self.rate_per_hour():.0f}/h | queue {queued}, settling {settling}{behind} | "
            f"last latency {latency} | {self.particles / max(self.count, 1):.0f} particles per micrograph"
        )


def catch_up_s(backlog: int, picking_per_hour: float | None) -> float | None:
    """Seconds of picking the ``backlog`` holds at the current rate (None without a rate)."""
    return backlog / picking_per_hour * 3600 if picking_per_hour else None


def catch_up_text(backlog: int, picking_per_hour: float | None) -> str:
    """``~N s (or min) of picking``, for a log line, the status line and the web view."""
    seconds = catch_up_s(backlog, picking_per_hour)
    if seconds is None:
        return "no picking rate yet"
    return f"~{seconds:.0f} s of picking" if seconds < 120 else f"~{seconds / 60:.0f} min of picking"


class StatusLine(logging.Handler):
    """A logging handler for a terminal: records scroll above one status line redrawn in place."""

    CLEAR = "\r\x1b[K"

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(f"{self.CLEAR}{self.format(record)}\n{self.line}")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never stop the daemon
            self.handleError(record)

    def show(self, line: str) -> None:
        if line != self.line:
            self.line = line
            self.stream.write(f"{self.CLEAR}{line}")
            self.stream.flush()

    def finish(self) -> None:
        """Leave the last status on its own line."""
        if self.line:
            self.stream.write("\n")
            self.stream.flush()
            self.line = ""
