"""A running daemon's own figures for the web view, read from the server's threads without touching the daemon's state.

:class:`LiveFigures` reads counters the daemon keeps anyway (queue, settling files, the
rate and latency of its status line, the model and the adaptation's progress) and keeps
its own samples of the backlog, so the falling-behind rule of :mod:`emmae.runtime.stream.health`
(a backlog beyond the queue that keeps growing) is judged from what the page has seen.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from emmae.runtime.stream.daemon import Daemon
from emmae.runtime.stream.health import PACE_INTERVAL_S
from emmae.runtime.web.folder import FolderView
from emmae.runtime.web.server import ViewServer, serve

SAMPLES = 256  # backlog samples kept (one per status computed, at most one a second)


class LiveFigures:
    """Called with no argument: the daemon's figures now, as a dict (see :func:`emmae.runtime.web.figures.pace`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._backlog: deque[tuple[float, int]] = deque(maxlen=SAMPLES)
        self._lock = threading.Lock()

    def __call__(self) -> dict:
        daemon = self.daemon
        queued, settling = daemon.queued, daemon.admission.pending  # lengths read under the GIL; a race only ages them
        rate = daemon.progress.rate_per_hour()
        now = time.monotonic()
        with self._lock:
            older = [count for at, count in self._backlog if now - at >= PACE_INTERVAL_S]
            self._backlog.append((now, queued))
        return {
            "queued": queued, "settling": settling, "throughput_per_hour": rate or None,
            "latency_last_s": daemon.progress.last_latency_s, "backlog_growing": bool(older) and queued > older[-1],
            "model": daemon.model.id, "adapting": daemon.model.status() or None,
        }


def serve_daemon(daemon: Daemon, address: str, token: str | None = None) -> ViewServer:
    """The web view of a running daemon's output folder, with its live figures, served at ``address`` (``[HOST:]PORT``).

    Raises:
        ConfigError: a malformed address; EmmaeError: it cannot be bound.
    """
    view = FolderView(daemon.outputs.root, daemon.config, live=LiveFigures(daemon), path_of=daemon.scanner.path_of, watch=daemon.watch)
    return serve(view, address, token)
