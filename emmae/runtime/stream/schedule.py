"""The stream's schedule: when to scan, which admitted micrograph the pipeline gets next, when the index files are
rewritten and when what provisional sessions picked is picked again.

Scans come every ``stream.poll_interval_s``, when a settling file is due, or sooner on a
file-system event (at most every ``MIN_SCAN_INTERVAL_S``); a huge folder is scanned less
often, so scans cost ~``SCAN_SHARE`` of a core (and at least every ``MAX_SCAN_INTERVAL_S``).
Admitted micrographs wait in two queues: new ones, and those picked again (a provisional
session's, another model's), which go only when no new one waits and the pipeline is
idle, one at a time, so a new micrograph never waits behind many. The index files are
rewritten at most once per ``INDEX_INTERVAL_S`` (less often when large). Once the
stream's session is fixed, what provisional sessions picked is sent back once per fixed
session. The schedule only decides: the daemon acts, and nothing here touches a file,
the journal or the pipeline.
"""

from __future__ import annotations

from collections import deque

from emmae.config import StreamConfig
from emmae.runtime.jobs import Job

MIN_SCAN_INTERVAL_S = 0.25  # file-system events trigger scans no more often than this
SCAN_SHARE = 0.02  # ... nor more often than every 50 scan-times
MAX_SCAN_INTERVAL_S = 30.0  # ... but at least this often
INDEX_INTERVAL_S = 1.0  # the index files are rewritten at most this often (more rarely when large), and at exit
TICK_S = 1.0  # the loop wakes at least this often (the status line ticks once a second)


class Schedule:
    """The stream's pacing and queues; see the module docstring."""

    def __init__(self, stream: StreamConfig) -> None:
        self.poll_interval_s, self.repick_provisional = stream.poll_interval_s, stream.repick_provisional
        self.ready: deque[Job] = deque()  # admitted, waiting for room in the pipeline
        self.again: deque[Job] = deque()  # admitted to be picked again: behind every new micrograph
        self.queued: set[str] = set()  # keys ready or in the pipeline
        self.repicked_for: str | None = None  # the fixed session whose provisional picks were sent back
        self.last_scan, self.scan_cost_s = -float("inf"), 0.0
        self.index_written, self.index_cost_s = -float("inf"), 0.0

    # --- scans ------------------------------------------------------------------------------------

    def scan_due(self, now: float, changed: bool, settled_at: float) -> bool:
        """Time to scan: the poll interval is over, a settling file is due (``settled_at``), or the folder ``changed``."""
        spread_s = min(self.scan_cost_s / SCAN_SHARE, MAX_SCAN_INTERVAL_S)
        due = now - self.last_scan >= max(self.poll_interval_s, spread_s) or now >= settled_at
        woken = changed and now - self.last_scan >= max(MIN_SCAN_INTERVAL_S, spread_s)
        return due or woken

    def scanning(self, now: float) -> None:
        """A scan starts (the next is paced from now, even if this one fails)."""
        self.last_scan = now

    def scanned(self, cost_s: float) -> None:
        """The scan took ``cost_s``: a slow one spaces the next ones out."""
        self.scan_cost_s = cost_s

    def scan_soon(self) -> None:
        """Scan at the next step (a model switched, micrographs sent back to be picked again)."""
        self.last_scan = -float("inf")

    def wait_s(self, now: float, settled_at: float) -> float:
        """How long the loop may sleep: until a settling file is due, at most a tick or the poll interval."""
        return min(self.poll_interval_s, TICK_S, max(settled_at - now, MIN_SCAN_INTERVAL_S))

    # --- admitted micrographs ---------------------------------------------------------------------

    def later(self, key: str, retry_at: float, now: float) -> bool:
        """Not to be looked at now: already queued, or waiting out a retry until ``retry_at``."""
        return key in self.queued or retry_at > now

    def admit(self, key: str, job: Job, again: bool) -> None:
        """``job`` waits for the pipeline (``again``: picked before, behind every new micrograph)."""
        (self.again if again else self.ready).append(job)
        self.queued.add(key)

    def next_job(self, in_flight: int) -> Job | None:
        """The job the pipeline gets next, or None: a new micrograph first; one picked again only when none is new and
        nothing is in flight."""
        if self.ready:
            return self.ready.popleft()
        if self.again and not in_flight:
            return self.again.popleft()
        return None

    def finished(self, keys: list[str]) -> None:
        """Out of the pipeline (looked at again at a scan if recording them fails)."""
        self.queued.difference_update(keys)

    @property
    def waiting(self) -> int:
        """Admitted and not yet in the pipeline."""
        return len(self.ready) + len(self.again)

    # --- the index files and the provisional sessions' re-picks ------------------------------------

    def index_due(self, stale: bool, now: float) -> bool:
        """The index files are out of date and were not rewritten lately (rewriting costs at most ~10 % of the thread)."""
        return stale and now - self.index_written >= max(INDEX_INTERVAL_S, 10 * self.index_cost_s)

    def indexed(self, started: float, finished: float) -> None:
        self.index_written, self.index_cost_s = finished, finished - started

    def repick_due(self, fixed: str | None) -> bool:
        """The stream's session was just fixed (``fixed``: its digest): what provisional sessions picked is to be picked
        again with it (once per fixed session, unless ``stream.repick_provisional`` is off)."""
        if fixed is None or not self.repick_provisional or fixed == self.repicked_for:
            return False
        self.repicked_for = fixed
        return True
