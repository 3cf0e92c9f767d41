"""A stream's health: the stop file, folders that vanish and come back, and a backlog that keeps growing.

:class:`Health` looks, and warns once per change; it never stops or starts anything but
the :class:`StopFlag` it is given.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emmae.runtime.stream.status import catch_up_text

log = logging.getLogger("emmae.stream")
STOP_FILE = "EMMAE_STOP"
STOP_FILE_SLACK_S = 1.0  # a stop file this much older than the start still counts (file systems that keep whole seconds)
PACE_INTERVAL_S = 60.0  # how often the backlog is compared with the last look (a growing backlog: falling behind)


@dataclass
class StopFlag:
    """Set by a signal handler or the stop file; checked between micrographs."""

    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.reason)

    def handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        log.info("%s received: stopping after the micrograph in hand", self.reason)


class Health:
    """The watched and output folders of one stream, its stop file and its pace.

    ``started``: when the daemon started (``time.time()``); a stop file changed since then
    (while the model loads, say) is a stop, an older one is left from an earlier run.
    """

    def __init__(self, watch: Path, out: Path, journal_path: Path, now: float, started: float | None = None) -> None:
        self.watch, self.out, self.journal_path = watch, out, journal_path
        self._missing: set[str] = set()  # folders found gone (warned once)
        self._pace_at, self._pace_backlog = now, 0
        self._stop_file = _signature_of(watch / STOP_FILE)
        if self._stop_file is not None and started is not None and self._stop_file[0] >= (started - STOP_FILE_SLACK_S) * 1e9:
            self._stop_file = None  # created or touched since the start: obeyed at the first look
        elif self._stop_file is not None:
            log.warning("%s in %s is left from an earlier run: ignored (touch it again, or create it anew, to stop this daemon)", STOP_FILE, watch)

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

    def check_folders(self) -> bool:
        """Warn once when the watched or the output folder disappears (and once when it is back); True on any change."""
        changed = False
        for what, folder, present in (("watched", self.watch, self.watch.is_dir()),
                                      ("output", self.out, self.out.is_dir() and self.journal_path.exists())):
            if not present and str(folder) not in self._missing:
                self._missing.add(str(folder))
                if what == "output":
                    log.warning("the output folder %s (or its journal) was deleted: new outputs are written there again, "
                                "but the record of this session is lost at exit; restart the daemon", folder)
                else:
                    log.warning("the watched folder %s is gone: waiting for it to come back", folder)
                changed = True
            elif present and str(folder) in self._missing:
                self._missing.discard(str(folder))
                log.warning("the %s folder %s is back", what, folder)
                changed = True
        return changed

    def check_pace(self, now: float, backlog: int, depth: int, rate_per_hour: Callable[[], float]) -> bool:
        """Warn (at most once per ``PACE_INTERVAL_S``) when the micrographs waiting to be picked keep piling up."""
        if now - self._pace_at < PACE_INTERVAL_S:
            return False
        before = self._pace_backlog
        self._pace_at, self._pace_backlog = now, backlog
        if backlog > depth and backlog > before:
            log.warning("falling behind the acquisition: %d micrographs wait to be picked (%d %.0f s ago), %s; picking %.0f per hour",
                        backlog, before, PACE_INTERVAL_S, catch_up_text(backlog, rate_per_hour()), rate_per_hour())
            return True
        return False


def _signature_of(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino
