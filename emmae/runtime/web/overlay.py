"""One micrograph's picks for the web view, and its overlay: the micrograph binned to ``OVERLAY_SIDE_PX`` with its
picks circled (:func:`emmae.io.preview.render_preview`), as PNG.

Both are cached per micrograph and the modification time of its saved picks (and of the
micrograph file), so a page refreshing every few seconds reads and draws each micrograph
once. The micrograph file is found from the names the folder records (never from a request).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from emmae.config import EmmaeConfig
from emmae.errors import MicrographError
from emmae.io.mrc import read_micrograph
from emmae.io.preview import render_preview
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.picker import repick
from emmae.runtime.web.reading import SAVED_SUFFIX, Micrograph, mtime_ns

OVERLAY_SIDE_PX = 512
CACHED_PICKS, CACHED_OVERLAYS = 256, 32


@dataclass(frozen=True)
class SavedPicks:
    """A micrograph's picks as its saved file cuts them under the folder's configuration (micrograph pixels, x = column)."""

    name: str
    shape: tuple[int, int]
    diameter_px: float
    xy: np.ndarray
    score: np.ndarray
    session: dict | None


class Lru:
    """A small least-recently-used cache, safe across the server's threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> object | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: object, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


Locate = Callable[[Micrograph], "Path | None"]


class Overlays:
    """Saved picks and overlays of the micrographs of ``folder``; ``locate`` finds a micrograph's file (None: not found)."""

    def __init__(self, folder: Path, config: EmmaeConfig, locate: Locate) -> None:
        self.outputs, self.config, self.locate = OutputFolder(folder), config, locate
        self._picks, self._pngs = Lru(CACHED_PICKS), Lru(CACHED_OVERLAYS)

    def picks(self, stem: str) -> SavedPicks:
        """The saved picks of ``stem``.

        Raises:
            OSError, ValueError, KeyError: no readable saved picks.
        """
        key = (stem, os.stat(self.outputs.path(stem, SAVED_SUFFIX)).st_mtime_ns)
        found = self._picks.get(key)
        if found is None:
            picks = repick(self.outputs.load(stem), self.config)
            found = SavedPicks(picks.name, tuple(picks.shape), float(picks.diameter_px), picks.xy, np.asarray(picks.score), picks.session)
            self._picks.put(key, found)
        return found  # type: ignore[return-value]

    def png(self, micrograph: Micrograph) -> tuple[bytes, bool]:
        """The overlay of ``micrograph`` as PNG, and whether its file was found (else the picks are drawn on black).

        Raises:
            OSError, ValueError, KeyError: no readable saved picks.
        """
        picks = self.picks(micrograph.stem or "")
        path = self.locate(micrograph)
        changed = mtime_ns(path) if path is not None else None
        key = (micrograph.stem, mtime_ns(self.outputs.path(micrograph.stem or "", SAVED_SUFFIX)), str(path), changed)
        found = self._pngs.get(key)
        if found is None:
            found = (render_png(self._image(path, picks), picks), changed is not None)
            self._pngs.put(key, found)
        return found  # type: ignore[return-value]

    @staticmethod
    def _image(path: Path | None, picks: SavedPicks) -> np.ndarray:
        if path is not None:
            try:
                image = read_micrograph(path).data
                if image.shape == picks.shape:
                    return image
            except (MicrographError, OSError, ValueError):
                pass
        return np.zeros(picks.shape, np.float32)


def render_png(image: np.ndarray, picks: SavedPicks, side_px: int = OVERLAY_SIDE_PX) -> bytes:
    """``image`` binned to ``side_px`` on its longer side with ``picks`` circled, as PNG bytes.

    Raises:
        ValueError: it cannot be encoded.
    """
    ok, encoded = cv2.imencode(".png", render_preview(image, picks.xy, picks.diameter_px, max_side=side_px))
    if not ok:
        raise ValueError("cannot encode the overlay as PNG")
    return encoded.tobytes()


def locator(folder: Path, config: EmmaeConfig, watch: Path | None = None, project_root: Path | None = None,
            path_of: Callable[[str], Path] | None = None) -> Locate:
    """A function finding a recorded micrograph's file: by the daemon's own ``path_of`` (its journal key), else below
    the watched folder (given, or ``folder``'s parent: the stream's default output folder is ``WATCH/emmae_picks``),
    else its name under the project root (given, recorded, the watched folder's parent, the current folder)."""
    watches = [w for w in (watch, Path(folder).parent) if w is not None]
    roots = [r for r in (project_root, config.output.project_root) if r is not None]
    roots += [w.parent for w in watches] + [Path.cwd()]
    found: dict[str, Path] = {}

    def locate(micrograph: Micrograph) -> Path | None:
        if micrograph.key in found:
            return found[micrograph.key]
        candidates = [path_of(micrograph.key)] if path_of is not None else []
        candidates += [Path(micrograph.key)] if os.path.isabs(micrograph.key) else [w / micrograph.key for w in watches]
        candidates += [Path(micrograph.name)] if os.path.isabs(micrograph.name) else [Path(r) / micrograph.name for r in roots]
        for candidate in candidates:
            if candidate.is_file():
                found[micrograph.key] = candidate
                return candidate
        return None

    return locate
