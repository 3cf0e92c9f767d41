"""The completeness gate: a file the scanner found (:mod:`.scanner`) is handed on once it is whole.

A file is handed on only when its size, mtime, ctime and inode have not changed for
``settle_s`` seconds *and* the strict MRC check passes (header valid, data block
complete). A file whose data block still ends in zeros (a writer that set the full
size first, as ``rsync --preallocate`` and download tools do, and fills it in later)
is handed on only once it has not changed for ``stale_after_s``. A file that is still
incomplete after ``stale_after_s`` without any change is given up on (the caller
records it as failed, and tries again if it changes); that time counts from the file's
last change (its mtime and ctime), not from when the daemon first saw it. A header
that can never do (``vet``, e.g. too small for the particles) is refused before the
data block is looked at. Only regular files are
considered: a FIFO, a device or a symlink loop is rejected without being opened.
The strict check reads a file's header only when the file changed since the last
look, so thousands of unfinished files cost one ``stat`` each per scan.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emmae.errors import IncompleteMRCError, MicrographError, NotRegularFileError, TruncatedMRCError
from emmae.io.mrc import HEADER_BYTES, MODE_BYTES, MrcLayout, check_complete
from emmae.runtime.jobs import signature

log = logging.getLogger("emmae.stream")
ZERO_TAIL_BYTES = 4096  # a data block whose last bytes are all zero may still be filled in (preallocated)


def stat_regular(path: Path) -> os.stat_result | None:
    """The file's stat (following links), None if it is gone.

    Raises:
        NotRegularFileError: a symlink loop or an unreadable path, or not a regular file.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NotRegularFileError(path, f"cannot be examined: {exc.strerror or exc}") from None
    if not stat_module.S_ISREG(stat.st_mode):
        raise NotRegularFileError(path, "not a regular file (a FIFO, a device or a folder); only regular files are read")
    return stat


@dataclass
class _Watch:
    signature: tuple[int, int, int, int]
    since: float  # when it was first seen as it is (settle_s counts from here)
    changed: float  # when it last changed, from its mtime and ctime (stale_after_s counts from here)
    verdict: str = ""  # of the strict check of this version: '' (not yet), 'incomplete' or 'zeros'
    reason: str = ""
    layout: MrcLayout | None = None  # the header as the strict check parsed it


class Gate:
    """Tracks files until they are stable and complete (``stale_after_s``: how long an unchanging incomplete file is waited for).

    The header a file was let through with (parsed and checked against its size once) is
    handed on by :meth:`take_layout`, so nothing downstream parses or sizes it again.
    """

    def __init__(self, settle_s: float, stale_after_s: float = float("inf"),
                 vet: Callable[[Path, MrcLayout], object] | None = None) -> None:
        """``vet(path, header)``: raises for a header that will never do (e.g. too small for the particles), before the
        data are looked at: such a file is refused at once, not waited for."""
        self.settle_s, self.stale_after_s, self.vet = settle_s, stale_after_s, vet
        self._watched: dict[Path, _Watch] = {}
        self._ready: dict[Path, MrcLayout] = {}

    def check(self, path: Path, now: float | None = None, stat: os.stat_result | None = None) -> str:
        """``ready``, ``waiting`` or ``gone``; raises :class:`MicrographError` for a file that will never do.

        An incomplete file that has not changed for ``stale_after_s`` raises
        :class:`TruncatedMRCError` (it is given up on until it changes).
        """
        now = time.monotonic() if now is None else now
        try:
            if stat is None:  # else the caller's, just taken (following links)
                stat = stat_regular(path)
            elif not stat_module.S_ISREG(stat.st_mode):
                raise NotRegularFileError(path, "not a regular file (a FIFO, a device or a folder); only regular files are read")
        except MicrographError:
            self._watched.pop(path, None)
            raise
        if stat is None:
            self._watched.pop(path, None)
            return "gone"
        seen = self._watched.get(path)
        if seen is None or seen.signature != signature(stat):
            untouched_s = max(0.0, time.time() - max(stat.st_mtime, stat.st_ctime))  # a file found long after its last write
            seen = self._watched[path] = _Watch(signature(stat), now, now - untouched_s)
            if self.settle_s > 0:
                return "waiting"
        elif now - seen.since < self.settle_s:
            return "waiting"
        if not seen.verdict:  # the strict check runs once per version of the file
            seen.verdict, seen.reason, seen.layout = self._complete(path)
            if seen.verdict == "ready":
                return self._let_through(path, seen)
            log.info("%s: %s, and not growing; waiting for it (given up after %g s without a change)", os.path.basename(path),
                     seen.reason, self.stale_after_s)
        stable_s = now - seen.changed
        if stable_s < self.stale_after_s:
            return "waiting"
        self._watched.pop(path, None)
        if seen.verdict == "zeros":
            log.warning("%s: its data block ends in zeros but it has not changed for %.0f s: taken as complete", os.path.basename(path), stable_s)
            return self._let_through(path, seen)
        raise TruncatedMRCError(path, f"incomplete and unchanged for {stable_s:.0f} s ({seen.reason})")

    def _let_through(self, path: Path, seen: _Watch) -> str:
        self._watched.pop(path, None)
        if seen.layout is not None:
            self._ready[path] = seen.layout
        return "ready"

    def next_due(self) -> float:
        """When (``time.monotonic()``) the earliest settling file will have been stable for ``settle_s`` (inf when none)."""
        settling = [w.since for w in self._watched.values() if not w.verdict]
        return min(settling) + self.settle_s if settling else float("inf")

    def take_layout(self, path: Path) -> MrcLayout | None:
        """The header ``path`` was just let through with (once; None if it was not)."""
        return self._ready.pop(path, None)

    def _complete(self, path: Path) -> tuple[str, str, MrcLayout | None]:
        """('ready' | 'incomplete' | 'zeros', reason, header) of the strict check."""
        try:
            layout = check_complete(path)
            if self.vet is not None:
                self.vet(path, layout)  # a header that can never hold particles: refused now, whatever its data
        except IncompleteMRCError as exc:
            return "incomplete", exc.reason, None
        except Exception:
            self._watched.pop(path, None)
            raise
        end = HEADER_BYTES + layout.extended_header_bytes + layout.nx * layout.ny * MODE_BYTES[layout.mode]
        if _zero_tail(path, end):
            return "zeros", "the data block still ends in zeros", layout
        return "ready", "", layout

    def forget(self, path: Path) -> None:
        self._watched.pop(path, None)
        self._ready.pop(path, None)

    @property
    def pending(self) -> int:
        """Files still being watched (not yet stable or complete)."""
        return len(self._watched)


def _zero_tail(path: Path, end: int) -> bool:
    """The last ``ZERO_TAIL_BYTES`` of the data block (ending at byte ``end``) are all zero."""
    start = max(HEADER_BYTES, end - ZERO_TAIL_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        tail = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    return len(tail) > 0 and not any(tail)
