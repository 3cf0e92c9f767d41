"""Discovery and the completeness gate.

A file is handed on only when its size and mtime have not changed for ``settle_s``
seconds *and* the strict MRC check passes (header valid, data block complete). Hidden
files and the usual temporary names of copy tools are never considered.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from emmae.errors import IncompleteMRCError, MicrographError
from emmae.io.mrc import check_complete

TEMPORARY = ("*~", "*.tmp", "*.part", "*.partial", "*.filepart", "*downloading*", "*.crdownload")


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled test for a name: matches a pattern, is not hidden, is not a temporary name."""
    wanted = re.compile("|".join(fnmatch.translate(p) for p in patterns))
    temporary = re.compile("|".join(fnmatch.translate(t) for t in TEMPORARY))
    return lambda name: not name.startswith(".") and wanted.match(name) is not None and temporary.match(name) is None


def is_candidate(name: str, patterns: tuple[str, ...]) -> bool:
    """Matches a pattern and is neither hidden nor a temporary name."""
    return _matcher(tuple(patterns))(name)


def scan(folder: Path, patterns: tuple[str, ...], recursive: bool, skip: Path | None = None, known: Container[str] = frozenset()) -> Iterator[Path]:
    """Candidate files under ``folder`` (sorted; hidden folders and ``skip`` are not entered; paths in ``known`` left out)."""
    candidate = _matcher(tuple(patterns))
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or Path(root, d).resolve() != skip))
        for name in sorted(files):
            if candidate(name):
                path = os.path.join(root, name)
                if path not in known:
                    yield Path(path)
        if not recursive:
            break


@dataclass
class _Watch:
    size: int
    mtime_ns: int
    since: float


class Gate:
    """Tracks files until they are stable and complete."""

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self._watched: dict[Path, _Watch] = {}

    def check(self, path: Path, now: float | None = None) -> str:
        """``ready``, ``waiting`` or ``gone``; raises :class:`MicrographError` for a file that will never do."""
        now = time.monotonic() if now is None else now
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._watched.pop(path, None)
            return "gone"
        seen = self._watched.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self._watched[path] = _Watch(stat.st_size, stat.st_mtime_ns, now)
            return "waiting" if self.settle_s > 0 else self._complete(path)
        if now - seen.since < self.settle_s:
            return "waiting"
        return self._complete(path)

    def _complete(self, path: Path) -> str:
        try:
            check_complete(path)
        except IncompleteMRCError:
            return "waiting"
        except MicrographError:
            self._watched.pop(path, None)
            raise
        self._watched.pop(path, None)
        return "ready"

    @property
    def pending(self) -> int:
        """Files still being watched (not yet stable or complete)."""
        return len(self._watched)
