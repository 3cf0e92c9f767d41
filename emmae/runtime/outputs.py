"""The output folder: the one writer of what a pick leaves on disk, for every command.

An :class:`OutputFolder` owns, in one folder:

* ``emmae.lock``: one writer at a time (an ``emmae-pick``, an ``emmae-stream``, a re-threshold);
* each micrograph's files beside its stem: ``<stem>_autopick.star`` (RELION coordinates),
  ``<stem>_emmae.npz`` (what a re-threshold needs), ``<stem>.box``, ``<stem>.cbox``,
  ``<stem>_preview.png``; a stem is where RELION looks for the micrograph's coordinates
  (:mod:`emmae.io.layout`);
* the index files of everything picked: ``autopick.star`` (RELION 4/5's coordinate list),
  ``particles.star`` (every pick with its micrograph name) and ``micrographs.star``;
* ``failed.txt``: micrograph, kind of cause and reason, tab-separated;
* the session file ``emmae-session.json`` (the fitted session and the micrographs it was
  fitted on; ``session.json`` of older versions is still read), and while a stream's
  session is not yet fixed, ``emmae-session-samples.json`` (the micrographs counted so far);
* the run record ``emmae-config.json`` (configuration, version, command line).

Every file is written atomically (temporary file + ``os.replace``). It does not decide
what is picked or when: the commands and the daemon tell it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from emmae.config import EmmaeConfig
from emmae.errors import EmmaeError, OutputError
from emmae.io.atomic import TEMP_PREFIX, remove_stale_temporaries, write_bytes_atomic
from emmae.io.inputs import star_optics
from emmae.io.layout import relative_folder, tail_below
from emmae.io.mrc import MrcLayout, read_micrograph
from emmae.io.picks import (
    Optics,
    Picks,
    load_picks,
    save_picks,
    transform_xy,
    write_box,
    write_cbox,
    write_index,
    write_micrographs,
    write_particles,
    write_relion_coordinates,
)
from emmae.io.preview import write_class_montage, write_preview
from emmae.io.star import read_star
from emmae.runtime.picking.session import Session

log = logging.getLogger(__name__)
LOCK_FILE = "emmae.lock"
RECORD_FILE = "emmae-config.json"
FAILED_FILE = "failed.txt"
SESSION_FILE = "emmae-session.json"
CLASSES_FILE = "emmae-classes.png"  # the session classes' averages, each marked kept or dropped
OLD_SESSION_FILES = ("session.json",)  # written by emmae-pick before the two commands shared one name
SAMPLES_FILE = "emmae-session-samples.json"  # a stream's session samples so far (before the session is fixed)
INDEX_FILE, PARTICLES_FILE, MICROGRAPHS_FILE = "autopick.star", "particles.star", "micrographs.star"
STAR_SUFFIX = "_autopick.star"  # a micrograph's coordinate file beside its stem
OUTPUT_SUFFIXES = ("_autopick.star", "_emmae.npz", ".box", ".cbox", "_preview.png")  # a micrograph's files beside its stem
WRITE_TEST_BYTES = 1 << 16  # written (and removed) when opened: a folder without room for this cannot be used


@dataclass(frozen=True)
class IndexRow:
    """One picked micrograph in the index files: its name, stem, size, pixel size and picks (as written).

    ``shape``, ``xy`` and ``score`` are None when its saved picks cannot be read: it is
    then listed in ``autopick.star`` (its coordinate file is there) but not in
    ``particles.star`` or ``micrographs.star``.
    """

    name: str
    stem: str
    shape: tuple[int, int] | None
    pixel_size_A: float | None
    xy: np.ndarray | None  # [N, 2] after the output switches (flip, scale)
    score: np.ndarray | None  # [N]


@dataclass(frozen=True)
class Failure:
    """A micrograph that could not be picked: its path or name, whose fault (``micrograph``, ``config``, ``output``, ``unexpected``) and why."""

    micrograph: str
    kind: str
    reason: str


class OutputFolder:
    """One output folder (see the module docstring). Open it with :meth:`open`; close it to free the lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock: TextIO | None = None
        self._rows: dict[str, IndexRow] = {}  # stem -> index row of what this process wrote or read back

    @classmethod
    def open(cls, root: Path, lock: bool = True) -> OutputFolder:
        """Create ``root`` if needed, take its lock, remove temporaries of an interrupted run, check that files can be written there.

        Raises:
            OutputError: it cannot be created, is not a folder, is read-only or full.
            EmmaeError: another command writes there (it holds the lock).
        """
        folder = cls(root)
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot use the output folder {root}: it is a file, not a folder") from None
        except OSError as exc:
            raise OutputError(f"cannot use the output folder {root}: cannot create it: {exc.strerror or exc}") from None
        if not folder.root.is_dir():
            raise OutputError(f"cannot use the output folder {root}: it is not a folder")
        try:
            if lock:
                folder._lock = _take_lock(folder.root / LOCK_FILE)
            stale = remove_stale_temporaries(folder.root)
            _write_test(folder.root)
        except OSError as exc:
            folder.close()
            raise OutputError(f"cannot use the output folder {root}: {exc.strerror or exc}") from None
        if stale:
            log.info("removed %d temporary files left in %s by an interrupted run", len(stale), root)
        return folder

    def close(self) -> None:
        """Free the folder for another command."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one micrograph ----------------------------------------------------------------------

    def path(self, stem: str, suffix: str = "_autopick.star") -> Path:
        return self.root / f"{stem}{suffix}"

    @staticmethod
    def recorded(stem: str) -> str:
        """How a journal records ``stem``'s coordinate file: relative to the output folder, so a moved or copied folder keeps it."""
        return f"{stem}{STAR_SUFFIX}"

    def stem_of(self, recorded: str | None) -> str | None:
        """The stem of a recorded coordinate file: relative to this folder (:meth:`recorded`), or an older absolute path,
        inside the folder or (moved or copied since) found here by its tail. None when there is none."""
        if not recorded or not recorded.endswith(STAR_SUFFIX):
            return None
        base = recorded[: -len(STAR_SUFFIX)]
        if not os.path.isabs(base):
            return os.path.normpath(base)
        for root in (str(self.root), os.path.abspath(self.root), os.path.realpath(self.root)):
            relative = os.path.relpath(base, root)
            if not relative.startswith(".."):
                return relative
        return tail_below(self.root, base, (STAR_SUFFIX, "_emmae.npz"))

    def write_micrograph(self, stem: str, picks: Picks, config: EmmaeConfig, source: Path | None = None, layout: MrcLayout | None = None) -> Path:
        """The files of one micrograph's ``picks`` (the preview re-reads ``source``, with its admitted header ``layout``
        when given); returns its coordinate file's path.

        Raises:
            OutputError: a file could not be written; MicrographError: ``source`` cannot be read for the preview.
        """
        folder = self.path(stem, "").parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None
        output = config.output
        xy = transform_xy(picks.xy, picks.shape, output)
        box = picks.diameter_px * output.coordinate_scale * 1.5
        save_picks(self.path(stem, "_emmae.npz"), picks)
        if "star" in output.formats:
            write_relion_coordinates(self.path(stem), xy, picks.score)
        size_xy = (picks.shape[1] * output.coordinate_scale, picks.shape[0] * output.coordinate_scale)
        if "box" in output.formats:
            write_box(self.path(stem, ".box"), xy, box, size_xy)
        if "cbox" in output.formats:
            write_cbox(self.path(stem, ".cbox"), transform_xy(picks.candidates_xy, picks.shape, output), picks.candidates_score, box,
                       particle_px=picks.diameter_px * output.coordinate_scale, size_xy=size_xy)
        if output.preview and source is not None:
            write_preview(self.path(stem, "_preview.png"), read_micrograph(source, layout=layout).data, picks.xy, picks.diameter_px)
        self.remember(stem, picks, config)
        return self.path(stem)

    def remember(self, stem: str, picks: Picks | None, config: EmmaeConfig) -> None:
        """Keep the index row of ``picks``, already cut under ``config`` (written by another process, e.g. a cluster's worker,
        or read back by the caller); None: its saved picks cannot be read (listed in ``autopick.star`` only)."""
        if picks is None:
            self._rows[stem] = IndexRow("", stem, None, None, None, None)
            return
        self._rows[stem] = IndexRow(picks.name, stem, picks.shape, picks.pixel_size_A, transform_xy(picks.xy, picks.shape, config.output),
                                    np.asarray(picks.score, np.float64))

    def remove_micrograph(self, stem: str, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> int:
        """Delete a micrograph's files of ``suffixes``; returns how many there were."""
        removed = 0
        for suffix in suffixes:
            try:
                self.path(stem, suffix).unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.path(stem, suffix), exc.strerror or exc)
        self._rows.pop(stem, None)
        return removed

    def saved_stems(self) -> list[str]:
        """The stem of every micrograph with a saved ``_emmae.npz`` (sub-folders too), sorted."""
        return sorted(str(p.relative_to(self.root))[: -len("_emmae.npz")] for p in self.root.rglob("*_emmae.npz"))

    def indexed_names(self) -> dict[str, str]:
        """stem -> micrograph name, as the current ``autopick.star`` lists them (empty when there is none); its coordinate
        files are found here whatever folder their paths were written from (the project's, or an older absolute path)."""
        try:
            frame = read_star(self.root / INDEX_FILE)["coordinate_files"]
        except (OSError, KeyError, ValueError):
            return {}
        found = {}
        for coordinates, name in zip(frame["rlnMicrographCoordinates"], frame["rlnMicrographName"]):
            text = str(coordinates)
            stem = tail_below(self.root, text[: -len(STAR_SUFFIX)], (STAR_SUFFIX,)) if text.endswith(STAR_SUFFIX) else None
            if stem is not None:
                found[stem] = str(name)
        return found

    def load(self, stem: str) -> Picks:
        """The saved picks of ``stem`` as saved (the caller cuts them under a configuration: ``picker.repick``).

        Raises:
            OSError, ValueError, KeyError: no readable ``_emmae.npz``.
        """
        return load_picks(self.path(stem, "_emmae.npz"))

    # --- the whole run ------------------------------------------------------------------------

    def remembers(self, stem: str) -> bool:
        """Its index row is at hand (no file to read)."""
        return stem in self._rows

    def row(self, stem: str) -> IndexRow:
        """``stem``'s index row as remembered (:meth:`write_micrograph`, :meth:`remember`); nothing is read or cut here:
        a stem not remembered gets a row without picks (listed in ``autopick.star`` only)."""
        return self._rows.get(stem) or IndexRow("", stem, None, None, None, None)

    def write_index(self, rows: list[IndexRow], config: EmmaeConfig, project: Path | None = None) -> None:
        """``autopick.star``, ``particles.star`` and ``micrographs.star`` of ``rows``, in their order; the coordinate files
        in ``autopick.star`` relative to the ``project`` folder, where RELION runs (default ``output.project_root``, else
        the current folder): never absolute, so a moved or copied project keeps its index.

        Raises:
            OutputError: a file could not be written.
        """
        project = project or (Path(config.output.project_root) if config.output.project_root is not None else Path.cwd())
        prefix = relative_folder(self.root, project)
        write_index(self.root / INDEX_FILE, [(r.name, os.path.normpath(os.path.join(prefix, self.recorded(r.stem)))) for r in rows])
        known = [r for r in rows if r.shape is not None]
        scale = config.output.coordinate_scale
        write_particles(self.root / PARTICLES_FILE, [(r.name, r.xy, r.score, r.pixel_size_A and r.pixel_size_A / scale) for r in known],
                        optics_of(config))
        write_micrographs(self.root / MICROGRAPHS_FILE, [(r.name, r.shape, r.pixel_size_A) for r in known])

    def write_failed(self, failures: list[Failure]) -> Path:
        """``failed.txt``: a header and one ``micrograph<TAB>kind<TAB>reason`` line per failure (removed when none). Raises OutputError."""
        path = self.root / FAILED_FILE
        if not failures:
            path.unlink(missing_ok=True)
            return path
        lines = ["# micrograph\tkind\treason", *(f"{printable(f.micrograph)}\t{f.kind}\t{printable(f.reason)}" for f in failures)]
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
        return path

    def write_session(self, session: Session, sample: list[str]) -> Path:
        """The session file (the session, its summary, the micrographs it was fitted on) and its class montage. Raises OutputError."""
        record = {"summary": session.summary(), "sample": sample, "session": json.loads(session.to_json())}
        write_bytes_atomic(path := self.root / SESSION_FILE, (json.dumps(record, indent=1) + "\n").encode())
        if session.classes is not None:
            self.write_classes(session)
        return path

    def write_classes(self, session: Session, keep: tuple[int, ...] = (), drop: tuple[int, ...] = ()) -> None:
        """``emmae-classes.png``: the session classes' averages, kept or dropped (a user's ``keep``/``drop`` over the session's). Raises OutputError."""
        write_class_montage(self.root / CLASSES_FILE, *session.classes.montage(keep, drop))

    def redraw_classes(self, keep: tuple[int, ...], drop: tuple[int, ...]) -> None:
        """``emmae-classes.png`` drawn again with a user's ``keep``/``drop`` (nothing when the saved session has no classes)."""
        if (session := self.read_session()) is not None and session.classes is not None:
            self.write_classes(session, keep, drop)

    def read_session(self) -> Session | None:
        """The session saved here (this version's file, or an older stream's); None when there is none to read back."""
        for name in (SESSION_FILE, *OLD_SESSION_FILES):
            path = self.root / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
                saved = data.get("session", data) if isinstance(data, dict) else None
                if isinstance(saved, dict) and "centroids" in saved:  # an older emmae-pick wrote only the summary
                    return Session.from_json(json.dumps(saved))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s cannot be read (%s); the session is fitted again", path, exc)
        return None

    def write_session_samples(self, names: list[str]) -> None:
        """The names of the micrographs a stream's session is being fitted on, in order (``emmae-session-samples.json``)."""
        write_bytes_atomic(self.root / SAMPLES_FILE, (json.dumps({"samples": names}, indent=1) + "\n").encode())

    def read_session_samples(self) -> list[str]:
        """The names :meth:`write_session_samples` wrote (none when there is no readable file)."""
        try:
            names = json.loads((self.root / SAMPLES_FILE).read_text())["samples"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [str(name) for name in names] if isinstance(names, list) else []

    def write_record(self, record: dict) -> None:
        """The run record (``emmae-config.json``). Raises OutputError."""
        write_bytes_atomic(self.root / RECORD_FILE, json.dumps(record, indent=2).encode())

    def read_record(self) -> dict:
        """The run record.

        Raises:
            EmmaeError: missing, unreadable, or without a configuration.
        """
        path = self.root / RECORD_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise EmmaeError(f"{path} not found: {self.root} is not an emmae-pick or emmae-stream output folder") from None
        except (OSError, ValueError) as exc:
            raise EmmaeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise EmmaeError(f"{path} holds no configuration")
        return record


def optics_of(config: EmmaeConfig) -> Optics:
    """``particles.star``'s optics: the configured values, RELION's import defaults for those not given."""
    given = {name: getattr(config.output, name) for name in ("voltage_kV", "spherical_aberration_mm", "amplitude_contrast")}
    return Optics(**{name: value for name, value in given.items() if value is not None})


def with_star_optics(config: EmmaeConfig, stars: list[str | Path]) -> EmmaeConfig:
    """``config`` with the optics that it leaves open taken from the first micrographs STAR of ``stars`` that has them."""
    for star in stars:
        try:
            found = star_optics(star)
        except (OSError, ValueError):
            continue  # reported where its micrographs are read
        if found:
            update = {k: v for k, v in found.items() if getattr(config.output, k) is None}
            return config.model_copy(update={"output": config.output.model_copy(update=update)})
    return config


def printable(text: str) -> str:
    """``text`` for a log line or one tab-separated cell: control characters escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _take_lock(path: Path) -> TextIO:
    handle = open(path, "a")  # noqa: SIM115 - held open while the folder is in use
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EmmaeError(f"another emmae command is writing to {path.parent} (it holds {path})") from None
    return handle


def _write_test(folder: Path) -> None:
    """Write ``WRITE_TEST_BYTES`` to a temporary file in ``folder`` and remove it. Raises OSError (read-only, full)."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(bytes(WRITE_TEST_BYTES))
    finally:
        os.unlink(name)
