"""What the web view shows of one output folder: the figures of ``/api/status``, one micrograph's picks, its overlay.

A :class:`FolderView` reads a stream's journal (read-only) or, without one, a batch's
index files; with a running daemon's ``live`` figures beside them. Its answers are kept
for ``STATUS_TTL_S``, so any number of pages refreshing costs the picker one read a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from emmae.config import EmmaeConfig, validate_config
from emmae.runtime.outputs import INDEX_FILE, PARTICLES_FILE
from emmae.runtime.picking.classes import chosen_classes
from emmae.runtime.stream.adapter import FOLDER as ADAPT_FOLDER
from emmae.runtime.stream.names import shown
from emmae.runtime.web import figures
from emmae.runtime.web.overlay import Overlays, locator
from emmae.runtime.web.reading import (
    JournalReader,
    Micrograph,
    failed_file,
    folder_config,
    index_micrographs,
    mtime_ns,
    recorded_watch,
    session_file,
    session_samples,
)

log = logging.getLogger("emmae.web")
STATUS_TTL_S = 1.0  # /api/status is computed at most this often
LISTED = 500  # micrographs listed (and plotted): the last picked
HISTOGRAM_MICROGRAPHS = 20  # the figure-of-merit histogram covers the picks of the last micrographs
PICKS_LISTED = 5000  # picks of one micrograph given by /api/micrograph


class UnknownMicrograph(KeyError):
    """A stem the folder does not list as picked."""


def overruled(session: dict, config: EmmaeConfig) -> dict:
    """A session summary whose classes show the run's ``--keep-classes`` / ``--drop-classes`` over the session's choice."""
    classes = session.get("classes")
    keep, drop = set(config.postprocess.keep_classes), set(config.postprocess.drop_classes)
    if not classes or not (keep or drop):
        return session
    chosen = chosen_classes(classes["kept"], keep, drop)
    each = [{**c, "kept": c["class"] in chosen,
             "why": f"{'kept' if c['class'] in chosen else 'dropped'} by you (session: {c['why']})" if c["class"] in keep | drop else c["why"]}
            for c in classes["each"]]
    return {**session, "classes": {**classes, "each": each, "kept": [c["class"] for c in each if c["kept"]]}}


class FolderView:
    """The figures of ``folder`` (see the module docstring).

    ``config``: the stream's configuration (default: the folder's run record, else the defaults);
    ``live``: a running daemon's figures (:class:`emmae.runtime.web.live.LiveFigures`);
    ``path_of``: the daemon's journal key -> micrograph file; ``watch``, ``project_root``: where else micrographs are looked for.
    """

    def __init__(self, folder: Path, config: EmmaeConfig | None = None, live: Callable[[], dict] | None = None,
                 path_of: Callable[[str], Path] | None = None, watch: Path | None = None, project_root: Path | None = None) -> None:
        self.folder = Path(folder)
        self.config = config or folder_config(self.folder) or validate_config({})
        self.live = live
        self.journal = JournalReader(self.folder)
        self.overlays = Overlays(self.folder, self.config, locator(self.folder, self.config, watch or recorded_watch(self.folder),
                                                                  project_root, path_of))
        self._lock = threading.Lock()
        self._status: tuple[float, dict] | None = None
        self._index: tuple[tuple, list[Micrograph]] | None = None

    def micrographs(self) -> list[Micrograph]:
        """Every micrograph the folder records, oldest first (the journal's, else the batch index's).

        Raises:
            sqlite3.Error: the journal cannot be read.
        """
        with self._lock:
            if self.journal.exists():
                return self.journal.read()
            stamp = tuple(mtime_ns(self.folder / name) for name in (INDEX_FILE, PARTICLES_FILE))
            if self._index is None or self._index[0] != stamp or stamp == (None, None):
                self._index = (stamp, index_micrographs(self.folder))
            return self._index[1]

    def status(self) -> dict:
        """The figures of ``/api/status`` (at most ``STATUS_TTL_S`` old).

        Raises:
            sqlite3.Error: the journal cannot be read.
        """
        cached = self._status
        if cached is not None and time.monotonic() - cached[0] < STATUS_TTL_S:
            return cached[1]
        answer = self._compute()
        self._status = (time.monotonic(), answer)
        return answer

    def _compute(self) -> dict:
        micrographs = self.micrographs()
        live = self._live()
        picked = [m for m in micrographs if m.state == "picked" and m.stem is not None]
        latest = picked[-1] if picked else None
        adaptation = self.journal.adaptation() if self.journal.exists() else None
        return {
            "folder": str(self.folder), "source": "journal" if self.journal.exists() else "index", "live": live is not None,
            "time": time.time(), "counts": figures.counts(micrographs),
            "pace": figures.pace(micrographs, self.config.stream.queue_depth, live),
            "micrographs": figures.series(picked, LISTED),
            "latest": None if latest is None else {"stem": latest.stem, "name": latest.name, "particles": latest.particles},
            "figure_of_merit": {**figures.histogram(self._scores(picked[-HISTOGRAM_MICROGRAPHS:])),
                                "micrographs": len(picked[-HISTOGRAM_MICROGRAPHS:])},
            "session": self._session(latest, adaptation),
            "model": (live or {}).get("model") or (latest.model if latest else None),
            "adaptation": _adaptation(adaptation, (live or {}).get("adapting")),
            "failed": self._failed(micrographs),
        }

    def _live(self) -> dict | None:
        if self.live is None:
            return None
        try:
            return self.live()
        except Exception as exc:  # noqa: BLE001 - the daemon's figures are a bonus; the journal has the rest
            log.debug("live figures unavailable: %s", exc)
            return None

    def _scores(self, picked: list[Micrograph]) -> np.ndarray:
        scores = []
        for m in picked:
            try:
                scores.append(self.overlays.picks(m.stem or "").score)
            except (OSError, ValueError, KeyError):
                continue  # being replaced, or removed: left out
        return np.concatenate(scores) if scores else np.zeros(0)

    def _session(self, latest: Micrograph | None, adaptation: dict | None) -> dict:
        """The fixed session (the adapted model's once adapted), else the provisional one of the latest micrograph."""
        needed = self.config.cluster.session_micrographs
        folders = ([self.folder / ADAPT_FOLDER] if (adaptation or {}).get("state") == "done" else []) + [self.folder]
        for folder in folders:
            fixed = session_file(folder)
            if fixed is not None:
                return {**overruled(fixed, self.config), "fixed": True, "samples": len(fixed.get("sample") or []), "samples_needed": needed}
        provisional = {}
        if latest is not None:
            try:
                provisional = self.overlays.picks(latest.stem or "").session or {}
            except (OSError, ValueError, KeyError):
                pass
        return {**provisional, "fixed": False, "profile": None, "samples": len(session_samples(self.folder)), "samples_needed": needed}

    def _failed(self, micrographs: list[Micrograph]) -> list[dict]:
        if not self.journal.exists():
            return failed_file(self.folder)
        failed = sorted((m for m in micrographs if m.state == "failed"), key=lambda m: m.key)
        return [{"micrograph": shown(m.key), "kind": m.kind or "micrograph", "reason": shown(m.reason or "")} for m in failed]

    def find(self, stem: str) -> Micrograph:
        """The picked micrograph of ``stem``.

        Raises:
            UnknownMicrograph: the folder lists no picked micrograph of that stem.
        """
        for m in reversed(self.micrographs()):
            if m.stem == stem and m.state == "picked":
                return m
        raise UnknownMicrograph(stem)

    def micrograph(self, stem: str) -> dict:
        """One picked micrograph's name, particles and picks (x, y in its pixels, figure of merit) for ``/api/micrograph``.

        Raises:
            UnknownMicrograph: not listed; OSError, ValueError, KeyError: its saved picks cannot be read.
        """
        m = self.find(stem)
        picks = self.overlays.picks(stem)
        return {"stem": stem, "name": m.name, "particles": int(len(picks.score)), "recorded_particles": m.particles,
                "shape": list(picks.shape), "diameter_px": picks.diameter_px, "latency_s": m.latency_s, "model": m.model,
                "mean_figure_of_merit": float(picks.score.mean()) if len(picks.score) else None,
                "picks": [[round(float(x), 1), round(float(y), 1), round(float(s), 4)]
                          for (x, y), s in zip(picks.xy[:PICKS_LISTED], picks.score[:PICKS_LISTED])]}

    def overlay(self, stem: str) -> bytes:
        """The overlay PNG of a picked micrograph.

        Raises:
            UnknownMicrograph: not listed; OSError, ValueError, KeyError: its saved picks cannot be read.
        """
        return self.overlays.png(self.find(stem))[0]


def _adaptation(recorded: dict | None, progress: str | None) -> dict | None:
    """The journal's record of the adaptation with the running daemon's progress text; None when the stream does not adapt."""
    if recorded is None and not progress:
        return None
    return {**(recorded or {}), "progress": progress or None}
