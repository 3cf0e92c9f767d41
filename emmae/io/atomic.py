"""Atomic file writes: a temporary file in the destination folder, fsync, ``os.replace``.

Readers (RELION, cryoSPARC, the daemon's own restart) see either the old file or
the complete new one, never a partial write. A failed write (disk full, no
permission) leaves no temporary file behind and raises :class:`OutputError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from emmae.errors import OutputError

TEMP_PREFIX = ".emmae-tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Raises:
        OutputError: the folder is not writable, the disk is full, or the writer failed
            with an ``OSError``; the temporary file is removed first.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; outputs get the usual umask
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. Raises :class:`OutputError`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any writer thread starts
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _default_mode() -> int:
    return 0o666 & ~_UMASK


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed writer left under ``folder``; returns them.

    Only for a folder that no other writer is using (the daemon holds its lock first).
    """
    stale = [p for p in Path(folder).rglob(f"{TEMP_PREFIX}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
