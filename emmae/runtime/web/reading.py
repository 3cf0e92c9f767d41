"""Reading an output folder without writing to it.

* the stream's journal, through a read-only SQLite connection (``mode=ro``, and
  ``immutable=1`` when no daemon has it open, so that not even SQLite's ``-wal`` and
  ``-shm`` files appear), read incrementally: only rows changed since the last read;
* a batch's index files (``autopick.star``, ``particles.star``) and ``failed.txt``;
* the session file, the session samples and the run record.

A file that is missing or half-written reads as absent; nothing here raises for one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from emmae.config import EmmaeConfig, validate_config
from emmae.errors import EmmaeError
from emmae.io.star import read_star
from emmae.runtime.outputs import FAILED_FILE, INDEX_FILE, PARTICLES_FILE, RECORD_FILE, SESSION_FILE, OutputFolder
from emmae.runtime.stream.journal import FILENAME as JOURNAL_FILE

log = logging.getLogger("emmae.web")
SAVED_SUFFIX = "_emmae.npz"


@dataclass(frozen=True)
class Micrograph:
    """One micrograph as the folder records it. ``key``: the journal's key (a batch: the stem); times are wall-clock seconds."""

    key: str
    name: str
    state: str  # picked, failed, seen (waiting or settling), processing
    stem: str | None
    particles: int | None
    latency_s: float | None = None
    recorded_at: float | None = None  # when the journal (or the saved picks' file) last changed it
    acquired_at: float | None = None  # the micrograph file's mtime, as picked or failed
    model: str | None = None
    session: str | None = None
    reason: str | None = None
    kind: str | None = None


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the SQLite file ``path`` (closed on leaving).

    Raises:
        sqlite3.Error: it cannot be opened or read.
    """
    live = Path(f"{path}-wal").exists()  # a daemon has it open: share its WAL; otherwise nothing may be created beside it
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro" + ("" if live else "&immutable=1")
    db = sqlite3.connect(uri, uri=True, timeout=2.0, check_same_thread=False)
    try:
        yield db
    finally:
        db.close()


class JournalReader:
    """The micrographs of a stream's journal, kept up to date by reading only rows written since the last read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_FILE
        self.rows: dict[str, Micrograph] = {}
        self._since = -1.0

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[Micrograph]:
        """Every micrograph, oldest change first.

        Raises:
            sqlite3.Error: the journal cannot be read.
        """
        with read_only(self.path) as db:
            db.row_factory = sqlite3.Row
            changed = db.execute("SELECT * FROM micrographs WHERE updated >= ? ORDER BY updated", (self._since,)).fetchall()
        for row in changed:
            self.rows[row["path"]] = journal_micrograph(row, self.folder)
            self._since = max(self._since, float(row["updated"]))
        return sorted(self.rows.values(), key=lambda m: m.recorded_at or 0.0)

    def adaptation(self) -> dict | None:
        """The stream's adaptation (state, micrographs, attempts, reason), or None when it has none."""
        try:
            with read_only(self.path) as db:
                row = db.execute("SELECT state, micrographs, attempts, reason, model FROM adaptation WHERE id = 1").fetchone()
        except sqlite3.Error:  # no such table: a journal that never adapted
            return None
        if row is None:
            return None
        return {"state": row[0], "micrographs": len(json.loads(row[1] or "[]")), "attempts": row[2], "reason": row[3], "model": row[4]}


def journal_micrograph(row: sqlite3.Row, folder: Path) -> Micrograph:
    """One journal row as a :class:`Micrograph`."""
    keys = row.keys()
    timings = _json(row["timings"]) if "timings" in keys else {}
    file_ns = row["mtime_ns"]
    return Micrograph(
        key=row["path"], name=row["name"], state=row["state"], stem=stem_of(row["outputs"], folder), particles=row["particles"],
        latency_s=timings.get("latency") if isinstance(timings, dict) else None, recorded_at=float(row["updated"]),
        acquired_at=file_ns / 1e9 if file_ns else None, model=row["model"] if "model" in keys else None,
        session=row["session"] if "session" in keys else None, reason=row["reason"], kind=row["kind"] if "kind" in keys else None,
    )


def stem_of(outputs: str | None, folder: Path) -> str | None:
    """The stem (below ``folder``) of a journal's coordinate file (see :meth:`OutputFolder.stem_of`)."""
    return OutputFolder(folder).stem_of(outputs)


def index_micrographs(folder: Path) -> list[Micrograph]:
    """A folder without a journal (an ``emmae-pick`` batch): its ``autopick.star`` (else its saved picks), with the
    particle counts of ``particles.star``, in the order of the index."""
    outputs = OutputFolder(folder)
    names = outputs.indexed_names() or {stem: stem for stem in outputs.saved_stems()}
    counts = particle_counts(folder / PARTICLES_FILE)
    found = []
    for stem, name in names.items():
        saved_ns = mtime_ns(outputs.path(stem, SAVED_SUFFIX)) or mtime_ns(outputs.path(stem))
        found.append(Micrograph(key=stem, name=name, state="picked", stem=stem, particles=counts.get(name),
                                recorded_at=saved_ns / 1e9 if saved_ns else None))
    return found


def particle_counts(path: Path) -> dict[str, int]:
    """Picks per micrograph name in a ``particles.star`` (empty when it cannot be read)."""
    try:
        frame = read_star(path)["particles"]
    except (OSError, KeyError, ValueError):
        return {}
    return {str(name): int(n) for name, n in frame["rlnMicrographName"].value_counts().items()}


def failed_file(folder: Path) -> list[dict]:
    """The rows of ``failed.txt`` (micrograph, kind, reason); none when there is no readable file."""
    try:
        text = (folder / FAILED_FILE).read_text(errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            micrograph, kind, reason = (line.split("\t", 2) + ["", ""])[:3]
            rows.append({"micrograph": micrograph, "kind": kind, "reason": reason})
    return rows


def session_file(folder: Path) -> dict | None:
    """The fixed session saved in ``folder``: its summary, radial profile and sample; None when there is none."""
    record = _json_file(folder / SESSION_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("summary"), dict):
        return None
    session = record.get("session") if isinstance(record.get("session"), dict) else {}
    return {**record["summary"], "profile": session.get("profile"), "sample": record.get("sample", [])}


def session_samples(folder: Path) -> list[str]:
    """The micrographs a stream's session is being fitted on (none once it is fixed, or for a batch)."""
    return OutputFolder(folder).read_session_samples()


def folder_config(folder: Path) -> EmmaeConfig | None:
    """The configuration in the folder's run record (``emmae-config.json``), or None when there is none to read."""
    try:
        return validate_config(OutputFolder(folder).read_record()["config"])
    except (EmmaeError, ValueError, TypeError) as exc:
        log.debug("no usable run record in %s: %s", folder, exc)
        return None


def recorded_watch(folder: Path) -> Path | None:
    """The watched folder named on the command line of the run record (``--watch``), if any."""
    record = _json_file(folder / RECORD_FILE)
    argv = record.get("argv") if isinstance(record, dict) else None
    if isinstance(argv, list) and "--watch" in argv[:-1]:
        return Path(str(argv[argv.index("--watch") + 1]))
    return None


def is_output_folder(folder: Path) -> bool:
    """``folder`` holds what a stream or a batch leaves: a journal, an index, a run record or saved picks."""
    names = (JOURNAL_FILE, INDEX_FILE, RECORD_FILE, SESSION_FILE)
    return any((folder / n).is_file() for n in names) or next(folder.rglob(f"*{SAVED_SUFFIX}"), None) is not None


def mtime_ns(path: Path) -> int | None:
    """``path``'s modification time in nanoseconds, or None when it cannot be stat'ed."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _json(text: str | None) -> object:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _json_file(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
