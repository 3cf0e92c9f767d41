"""The session journal: one SQLite database in the output folder.

Every micrograph's state is one row: ``seen`` (found, not yet complete), ``processing``,
``picked`` (with its particle count and timings) or ``failed`` (with the reason and
the file's size and mtime, so it is retried only if the file changes). Outputs are
written (atomically) before a micrograph is marked ``picked``; on opening, rows left
``processing`` by a crash go back to ``seen`` and are redone, overwriting their
outputs, so a restart never loses or duplicates a micrograph.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

FILENAME = "emmae-journal.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS micrographs (
    path TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('seen', 'processing', 'picked', 'failed')),
    size INTEGER,
    mtime_ns INTEGER,
    particles INTEGER,
    outputs TEXT,
    reason TEXT,
    timings TEXT,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Entry:
    path: str
    name: str
    state: str
    size: int | None
    mtime_ns: int | None
    particles: int | None
    outputs: str | None
    reason: str | None


class Journal:
    """The journal of one output folder (single writer: the daemon's scanning thread)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / FILENAME
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._db.execute("UPDATE micrographs SET state = 'seen' WHERE state = 'processing'")

    def close(self) -> None:
        self._db.close()

    def get(self, path: str) -> Entry | None:
        row = self._db.execute(
            "SELECT path, name, state, size, mtime_ns, particles, outputs, reason FROM micrographs WHERE path = ?", (path,)
        ).fetchone()
        return Entry(*row) if row else None

    def wants(self, path: str, size: int, mtime_ns: int) -> bool:
        """True unless already picked, or failed and unchanged since."""
        entry = self.get(path)
        if entry is None or entry.state in ("seen", "processing"):
            return True
        if entry.state == "failed":
            return (entry.size, entry.mtime_ns) != (size, mtime_ns)
        return False

    def _upsert(self, path: str, name: str, state: str, **fields: object) -> None:
        columns = ["path", "name", "state", "updated", *fields]
        values = [path, name, state, time.time(), *fields.values()]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
        self._db.execute(
            f"INSERT INTO micrographs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT(path) DO UPDATE SET {updates}",
            values,
        )

    def mark_seen(self, path: str, name: str) -> None:
        if self.get(path) is None:
            self._upsert(path, name, "seen")

    def mark_unstarted(self, path: str, name: str) -> None:
        """Back to ``seen``: the micrograph was handed on but rolled back before it started."""
        self._upsert(path, name, "seen")

    def mark_processing(self, path: str, name: str) -> None:
        self._upsert(path, name, "processing", reason=None)

    def mark_picked(self, path: str, name: str, particles: int, outputs: str, timings: dict[str, float]) -> None:
        self._upsert(path, name, "picked", particles=particles, outputs=outputs, timings=json.dumps(timings), reason=None)

    def mark_failed(self, path: str, name: str, reason: str, size: int | None, mtime_ns: int | None) -> None:
        self._upsert(path, name, "failed", reason=reason, size=size, mtime_ns=mtime_ns)

    def picked(self) -> list[Entry]:
        """Every picked micrograph, in the order they were picked."""
        rows = self._db.execute(
            "SELECT path, name, state, size, mtime_ns, particles, outputs, reason FROM micrographs "
            "WHERE state = 'picked' ORDER BY updated"
        ).fetchall()
        return [Entry(*row) for row in rows]

    def picked_at(self) -> list[tuple[str, float]]:
        """(path, wall-clock time it was recorded as picked) of every picked micrograph."""
        return self._db.execute("SELECT path, updated FROM micrographs WHERE state = 'picked'").fetchall()

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM micrographs GROUP BY state").fetchall())
