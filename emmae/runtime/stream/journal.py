"""The session journal: one SQLite database in the output folder.

Every micrograph's state is one row, keyed on its path relative to the watched folder
(so two spellings of the same folder share one journal): ``seen`` (found, not yet
complete), ``processing``, ``picked`` (with its particle count, timings and the
file's size, mtime and inode, so a replaced file is noticed and picked again) or
``failed`` (with the reason, the kind of cause and the file's size and mtime). A
``micrograph`` failure is retried only if the file changes; a ``config`` failure
(no usable diameter or pixel size) also when the configuration changes (its hash is
stored); an ``output`` failure (full disk) after a delay. Outputs are written
(atomically) before a micrograph is marked ``picked``; on opening, rows left
``processing`` by a crash go back to ``seen`` and are redone, overwriting their
outputs, so a restart never loses or duplicates a micrograph.

Each picked row names the model that picked it (``model``: the bundle's file name and
the start of its SHA-256) and the session it was picked with (``session``: its id), so
what provisional sessions picked is picked again once the stream's session is fixed. A stream that adapts its model (``emmae-stream --adapt``)
keeps the adaptation's state in a one-row ``adaptation`` table.

Journals written by earlier versions (absolute paths as keys, no kind, hash, inode
or model) are migrated when opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from emmae.io.inputs import content_fingerprint

log = logging.getLogger("emmae.stream")

FILENAME = "emmae-journal.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS micrographs (
    path TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('seen', 'processing', 'picked', 'failed')),
    size INTEGER,
    mtime_ns INTEGER,
    particles INTEGER,
    outputs TEXT,  -- the coordinate file, relative to the output folder (absolute in older journals)
    reason TEXT,
    timings TEXT,
    updated REAL NOT NULL
)
"""
ADAPTATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS adaptation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    micrographs TEXT NOT NULL,
    bundle TEXT,
    model TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated REAL NOT NULL
)
"""
VERSION = 2  # PRAGMA user_version: 1 added kind, config_hash, ino; 2 keys on the path relative to the watched folder
COLUMNS = {"kind": "TEXT", "config_hash": "TEXT", "ino": "INTEGER", "model": "TEXT", "session": "TEXT", "repick": "INTEGER DEFAULT 0",
           "attempts": "INTEGER DEFAULT 0", "fingerprint": "TEXT", "ctime_ns": "INTEGER"}
KINDS = ("micrograph", "config", "output", "unexpected")
_FIELDS = "path, name, state, size, mtime_ns, particles, outputs, reason, kind, config_hash, ino, model, repick, attempts, fingerprint, ctime_ns"


def journal_key(relative: str) -> str:
    """A path as the journal stores it: text SQLite can hold (undecodable bytes written as ``\\xNN``)."""
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def key_path(key: str) -> str:
    """The path a key stands for, as the file system spells it (undecodable bytes, written ``\\xNN`` in the key, back)."""
    return re.sub(r"\\x([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m.group(1), 16)), key) if "\\x" in key else key


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
    kind: str | None = None
    config_hash: str | None = None
    ino: int | None = None
    model: str | None = None  # of a picked entry: the model that picked it
    repick: int = 0  # a picked entry to be picked again (a provisional session's, another model's); listed meanwhile
    attempts: int = 0  # picks of it that a crash of the daemon interrupted
    fingerprint: str | None = None  # of the file's content as picked (see emmae.io.inputs.content_fingerprint)
    ctime_ns: int | None = None


@dataclass(frozen=True)
class Adaptation:
    """The stream's fine-tuning: ``running`` (on ``micrographs``), ``done`` (``bundle``, identified as ``model``) or ``failed``."""

    state: str
    micrographs: list[str]
    bundle: str | None
    model: str | None
    attempts: int
    reason: str | None


class Journal:
    """The journal of one output folder (single writer: the daemon's scanning thread).

    ``config_hash``: the hash of the current configuration; a ``config`` failure
    recorded under another hash is wanted again. ``roots``: the spellings of the
    watched folder under which keys of an older journal (absolute paths) are rewritten
    relative to it.
    """

    def __init__(self, folder: Path, config_hash: str | None = None, roots: tuple[Path, ...] = ()) -> None:
        self.path = Path(folder) / FILENAME
        self.config_hash = config_hash
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._db.execute(ADAPTATION_SCHEMA)
        self._migrate(roots)
        self._db.execute("UPDATE micrographs SET state = 'seen' WHERE state = 'processing'")

    def _migrate(self, roots: tuple[Path, ...]) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        present = {row[1] for row in self._db.execute("PRAGMA table_info(micrographs)")}
        for column, kind in COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE micrographs ADD COLUMN {column} {kind}")
        empty = self._db.execute("SELECT 1 FROM micrographs LIMIT 1").fetchone() is None
        if version < 2 and roots and not empty:
            self._rekey(roots)
        new = VERSION if roots or empty else 1  # opened without the watched folder: the keys are rewritten at a later opening
        if version < new:
            self._db.execute(f"PRAGMA user_version = {new}")

    def _rekey(self, roots: tuple[Path, ...]) -> None:
        """Absolute keys of an older journal become relative to the watched folder (a duplicate keeps its newest row)."""
        bases = [str(r) for r in roots] + [os.path.abspath(r) for r in roots] + [os.path.realpath(r) for r in roots]
        rows = self._db.execute("SELECT path, state, updated FROM micrographs ORDER BY updated").fetchall()
        moved = 0
        self._db.execute("BEGIN")
        try:
            for path, _state, _updated in rows:
                new = _relative(path, bases)
                if new is None or new == path:
                    continue
                if self._db.execute("SELECT 1 FROM micrographs WHERE path = ?", (new,)).fetchone():
                    self._db.execute("DELETE FROM micrographs WHERE path = ?", (new,))  # an older row of the same file
                self._db.execute("UPDATE micrographs SET path = ? WHERE path = ?", (new, path))
                moved += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if moved:
            log.info("journal: %d entries now keyed relative to the watched folder", moved)

    def close(self) -> None:
        self._db.close()

    def get(self, path: str) -> Entry | None:
        row = self._db.execute(f"SELECT {_FIELDS} FROM micrographs WHERE path = ?", (path,)).fetchone()
        return Entry(*row) if row else None

    def wants(self, path: str, size: int, mtime_ns: int, ino: int | None = None) -> bool:
        """True unless picked and unchanged since, or failed and neither the file nor (for a config failure) the configuration changed."""
        entry = self.get(path)
        if entry is None or entry.state in ("seen", "processing"):
            return True
        if entry.state == "failed":
            if entry.kind in ("config", "unexpected") and entry.config_hash != self.config_hash:
                return True
            return (entry.size, entry.mtime_ns) != (size, mtime_ns)
        if entry.repick:
            return True
        return entry.size is not None and (entry.size, entry.mtime_ns) != (size, mtime_ns)  # an older journal's: unknown, kept

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

    def mark_processing(self, path: str, name: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Handed to the pipeline as the file of this size and mtime (what a crash while it is in hand is counted against)."""
        self._upsert(path, name, "processing", reason=None, size=size, mtime_ns=mtime_ns)

    def mark_picked(self, path: str, name: str, particles: int, outputs: str, timings: dict[str, float],
                    size: int | None = None, mtime_ns: int | None = None, ino: int | None = None, model: str | None = None,
                    session: str | None = None, fingerprint: str | None = None, ctime_ns: int | None = None) -> None:
        """Picked by ``model`` with ``session`` (its id) from the file of this size, mtime, inode, ctime and content
        fingerprint (:func:`changed_since_picked` tells a replaced file from a moved one)."""
        self._upsert(path, name, "picked", particles=particles, outputs=outputs, timings=json.dumps(timings), reason=None,
                     kind=None, size=size, mtime_ns=mtime_ns, ino=ino, config_hash=self.config_hash, model=model, session=session,
                     repick=0, attempts=0, fingerprint=fingerprint, ctime_ns=ctime_ns)

    def mark_failed(self, path: str, name: str, reason: str, size: int | None, mtime_ns: int | None, kind: str = "micrograph") -> None:
        """Failed for ``reason``; ``kind`` (one of ``KINDS``) says whose fault, and when it is worth trying again."""
        self._upsert(path, name, "failed", reason=reason, size=size, mtime_ns=mtime_ns, kind=kind, config_hash=self.config_hash)

    def adopt(self, files: list[tuple[str, int, int, int, int]]) -> None:
        """Record the file of picked entries as (path, size, mtime_ns, inode, ctime_ns): an older journal's that had none,
        or a picked file moved or copied since (the same content under another inode)."""
        if not files:
            return
        with self.batch():
            self._db.executemany("UPDATE micrographs SET size = ?, mtime_ns = ?, ino = ?, ctime_ns = ? WHERE path = ?",
                                 [(size, mtime_ns, ino, ctime_ns, path) for path, size, mtime_ns, ino, ctime_ns in files])

    def forget(self, path: str) -> None:
        """Remove ``path``'s entry, whatever its state (its file is gone)."""
        self._db.execute("DELETE FROM micrographs WHERE path = ?", (path,))

    def forget_failed(self, paths: list[str]) -> None:
        """Remove the failed entries of ``paths`` (their files are gone)."""
        with self.batch():
            self._db.executemany("DELETE FROM micrographs WHERE path = ? AND state = 'failed'", [(p,) for p in paths])

    def set_particles(self, particles: dict[str, int]) -> None:
        """Record how many particles picked entries have now (path -> count), e.g. after a re-threshold of the folder."""
        with self.batch():
            self._db.executemany("UPDATE micrographs SET particles = ? WHERE path = ?", [(n, p) for p, n in particles.items()])

    def set_outputs(self, outputs: dict[str, str]) -> None:
        """Record the coordinate file of picked entries anew (path -> file, relative to the output folder)."""
        with self.batch():
            self._db.executemany("UPDATE micrographs SET outputs = ? WHERE path = ?", [(o, p) for p, o in outputs.items()])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Everything written inside is one transaction (one sync to disk), rolled back on an error; nests."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def picked(self) -> list[Entry]:
        """Every picked micrograph, in the order they were picked."""
        rows = self._db.execute(f"SELECT {_FIELDS} FROM micrographs WHERE state = 'picked' ORDER BY updated").fetchall()
        return [Entry(*row) for row in rows]

    def failed(self) -> list[Entry]:
        """Every failed micrograph, by key."""
        rows = self._db.execute(f"SELECT {_FIELDS} FROM micrographs WHERE state = 'failed' ORDER BY path").fetchall()
        return [Entry(*row) for row in rows]

    def picked_at(self) -> list[tuple[str, float]]:
        """(path, wall-clock time it was recorded as picked) of every picked micrograph."""
        return self._db.execute("SELECT path, updated FROM micrographs WHERE state = 'picked'").fetchall()

    def unpick_other_models(self, model: str) -> list[str]:
        """Mark every micrograph picked by another model than ``model`` to be picked again; returns their keys."""
        return self._unpick("model IS NOT ?", (model,))

    def unpick_other_sessions(self, session: str, model: str | None) -> list[str]:
        """Mark what ``model`` picked with another (provisional) session than ``session`` to be picked again; returns their keys."""
        return self._unpick("session IS NOT NULL AND session != ? AND model IS ?", (session, model))

    def _unpick(self, condition: str, values: tuple) -> list[str]:
        """Picked entries stay picked (and listed in the index) until picked again; ``repick`` says they are due."""
        where = f"state = 'picked' AND {condition}"
        rows = self._db.execute(f"SELECT path FROM micrographs WHERE {where}", values).fetchall()
        self._db.execute(f"UPDATE micrographs SET repick = 1 WHERE {where}", values)
        return [row[0] for row in rows]

    def key_of(self, name: str) -> str | None:
        """The key of the micrograph written under ``name`` (None when there is none)."""
        row = self._db.execute("SELECT path FROM micrographs WHERE name = ? ORDER BY updated DESC LIMIT 1", (name,)).fetchone()
        return row[0] if row else None

    def count_attempt(self, path: str) -> int:
        """One more pick of ``path`` was interrupted by a crash of the daemon; returns how many so far."""
        self.mark_seen(path, path)
        self._db.execute("UPDATE micrographs SET attempts = COALESCE(attempts, 0) + 1 WHERE path = ?", (path,))
        row = self._db.execute("SELECT attempts FROM micrographs WHERE path = ?", (path,)).fetchone()
        return int(row[0]) if row else 0

    def adaptation(self) -> Adaptation | None:
        row = self._db.execute("SELECT state, micrographs, bundle, model, attempts, reason FROM adaptation WHERE id = 1").fetchone()
        if row is None:
            return None
        return Adaptation(row[0], json.loads(row[1]), row[2], row[3], int(row[4]), row[5])

    def set_adaptation(self, state: str, micrographs: list[str], bundle: str | None = None, model: str | None = None,
                       attempts: int = 0, reason: str | None = None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO adaptation (id, state, micrographs, bundle, model, attempts, reason, updated) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (state, json.dumps(micrographs), bundle, model, attempts, reason, time.time()),
        )

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM micrographs GROUP BY state").fetchall())


def changed_since_picked(entry: Entry, stat: os.stat_result, path: str | Path | None = None) -> bool:
    """The file is not the version that was picked.

    Another size or mtime: changed. The same inode and ctime: unchanged. Another inode or
    ctime (moved, copied with ``cp -a``, touched, or rewritten in place with the mtime put
    back): the content fingerprint decides, so a move or a copy is the same micrograph and
    a rewrite is not. An older journal's entry without a fingerprint: changed when the
    inode differs; without a recorded file at all: unchanged.
    """
    if entry.size is None or entry.mtime_ns is None:
        return False
    if (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        return True
    if entry.ino == stat.st_ino and entry.ctime_ns in (None, stat.st_ctime_ns):
        return False
    if entry.fingerprint is None or path is None:
        return entry.ino is not None and entry.ino != stat.st_ino
    try:
        return content_fingerprint(path) != entry.fingerprint
    except OSError:
        return True


def _relative(path: str, bases: list[str]) -> str | None:
    """``path`` (an older key: the watched folder as spelled, then the file) relative to the first of ``bases`` it lies under, or None."""
    candidates = [path, os.path.realpath(path)] if os.path.isabs(path) else [path]
    for candidate in candidates:
        for base in bases:
            base = base.rstrip("/") or "/"
            if candidate.startswith(base + "/"):
                return candidate[len(base) + 1 :]
    return None
