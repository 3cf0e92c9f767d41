"""Exceptions raised by the library. Every one derives from :class:`EmmaeError`.

The daemon catches :class:`MicrographError` per micrograph (record, skip, carry on),
and :class:`IncompleteMRCError` in particular as "not finished yet: look again later".
"""

from __future__ import annotations

from pathlib import Path


class EmmaeError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(EmmaeError, ValueError):
    """An invalid configuration value, file or override."""


class BackendError(EmmaeError, RuntimeError):
    """The requested compute backend (e.g. the GPU) cannot be used."""


class OutputError(EmmaeError, OSError):
    """An output file could not be written (disk full, permissions, ...)."""


class MicrographError(EmmaeError, ValueError):
    """A micrograph file that cannot be used. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotMRCError(MicrographError):
    """The file is not an MRC file (no 'MAP ' stamp, impossible dimensions)."""


class CorruptMRCError(MicrographError):
    """The header looks like MRC but mrcfile rejects the file."""


class UnsupportedModeError(MicrographError):
    """The MRC data mode is not one of 0, 1, 2, 6, 12."""


class MultiSectionError(MicrographError):
    """The file holds a stack of several sections, not one micrograph."""


class NonFiniteDataError(MicrographError):
    """The data contain NaN or infinite values."""


class IncompleteMRCError(MicrographError):
    """The data block is shorter than the header declares: still being written, or cut short."""


class EmptyMRCError(IncompleteMRCError):
    """The file has zero bytes."""


class TruncatedMRCError(IncompleteMRCError):
    """The file ends before the header or the data block does."""


class BundleError(EmmaeError, ValueError):
    """A model bundle that is missing, corrupt or incompatible with this version."""


class NotRegularFileError(MicrographError):
    """Not a regular file (a FIFO, a device, a folder) or one that cannot be opened (e.g. a symlink loop)."""


class MicrographSizeError(MicrographError):
    """The micrograph's dimensions cannot hold particles of the given diameter, or are absurdly elongated."""


class UnsafeNameError(MicrographError):
    """The file's name cannot be written safely to a STAR file or the journal (control characters, quotes, '#', not UTF-8)."""


class StarError(EmmaeError, ValueError):
    """A file that cannot be read as STAR (empty, half-written, not STAR at all). ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
