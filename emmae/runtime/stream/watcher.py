"""Waking the daemon early: a native file-system observer where events arrive, polling everywhere.

The daemon always polls (every ``stream.poll_interval_s``); on a local file system a
``watchdog`` observer also wakes it as soon as a file appears or changes, so the
poll interval can stay long without adding latency. Network file systems (NFS, SMB/
CIFS and the like) deliver no events for writes made on other hosts: there, and
whenever ``stream.poll = "always"``, the observer is not started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "lustre", "gpfs", "beegfs", "fuse.gvfsd-fuse",
})


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (from ``/proc/mounts``; '' if unknown)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = str(Path(path).resolve())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def wants_observer(folder: Path, poll: str, mounts: str | None = None) -> bool:
    """Start an observer unless polling is forced or the folder is on a network file system."""
    if poll == "always":
        return False
    kind = filesystem_type(folder, mounts)
    if kind in NETWORK_FILESYSTEMS:
        log.info("%s is on %s: polling only (no change events arrive from other hosts)", folder, kind)
        return False
    return True


#: Events that change nothing: the daemon's own header reads would otherwise wake it again and again.
QUIET_EVENTS = frozenset({"opened", "closed_no_write"})


def start_observer(folder: Path, recursive: bool, notify: Callable[[], None], ignore: Path | None = None,
                   on_path: Callable[[str], None] | None = None):
    """A running watchdog observer, or None without watchdog.

    On every event outside ``ignore`` that may change a file (not a mere open or a
    read-only close) it calls ``on_path(path)`` for each path involved (absolute, under
    the resolved ``folder``), then ``notify()``.
    """
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        log.info("watchdog is not installed: polling only")
        return None

    class _Wake(FileSystemEventHandler):
        def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's event type
            if event.event_type in QUIET_EVENTS:
                return
            paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
            paths = [p for p in paths if ignore is None or not Path(p).is_relative_to(ignore)]
            if not paths:
                return
            if on_path is not None:
                for path in paths:
                    on_path(path)
            notify()

    observer = Observer()
    observer.schedule(_Wake(), str(Path(folder).resolve()), recursive=recursive)  # absolute event paths, comparable with ``ignore``
    observer.daemon = True
    observer.start()
    return observer
