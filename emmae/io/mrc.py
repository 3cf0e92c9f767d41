"""Micrographs from MRC files through ``mrcfile``.

:func:`check_complete` is the cheap, strict gate the daemon calls on a new file
(header valid, data block complete); :func:`read_micrograph` reads one 2-D
micrograph (modes 0, 1, 2, 6, 12; 2-D or single-section 3-D), memory-mapped, as
float32. Each failure raises its own :class:`~emmae.errors.MicrographError`.

Only regular files are opened, and never in a way that can block (a FIFO named
``*.mrc`` is rejected, not waited on). :func:`check_dimensions` rejects, from the
header alone and before anything is allocated, a micrograph too small to hold a few
particles or absurdly elongated; every allocation that follows is bounded by the
file's real size (the data block must be on disk before it is read).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from emmae.errors import (
    CorruptMRCError,
    EmptyMRCError,
    IncompleteMRCError,
    MicrographSizeError,
    MultiSectionError,
    NonFiniteDataError,
    NotMRCError,
    NotRegularFileError,
    TruncatedMRCError,
    UnsupportedModeError,
)
from emmae.io.atomic import atomic_path

HEADER_BYTES = 1024
#: MRC mode -> bytes per voxel, for the modes a micrograph can use.
MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
_MAX_DIM = 1 << 20
#: A micrograph must be at least this many particle diameters across on its shorter side.
MIN_DIAMETERS = 3.0
#: ... and no more elongated than this (longer side / shorter side).
MAX_ASPECT = 8.0
#: The most pixels a micrograph may have (16384^2, beyond every detector's super-resolution frame): one whose header
#: claims more is refused from the header, before anything is read or allocated.
MAX_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class MrcLayout:
    """What the header says about the file's size and shape."""

    nx: int
    ny: int
    nz: int
    mode: int
    extended_header_bytes: int
    pixel_size_xy_A: tuple[float, float] | None = None  # cella / mxyz, None when absent

    @property
    def expected_bytes(self) -> int:
        return HEADER_BYTES + self.extended_header_bytes + self.nx * self.ny * self.nz * MODE_BYTES[self.mode]


@dataclass(frozen=True)
class Micrograph:
    """One micrograph: ``data[row, col]`` (y, x) in file order, float32."""

    path: Path
    data: np.ndarray
    pixel_size_xy_A: tuple[float, float] | None

    @property
    def pixel_size_A(self) -> float | None:
        """The pixel size in Angstrom (geometric mean of x and y), or None if the header has none."""
        if self.pixel_size_xy_A is None:
            return None
        return float(np.sqrt(self.pixel_size_xy_A[0] * self.pixel_size_xy_A[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape  # type: ignore[return-value]


def read_layout(path: str | Path) -> MrcLayout:
    """Parse and check the 1024-byte header, without reading data.

    Raises:
        EmptyMRCError: the file has zero bytes.
        TruncatedMRCError: the file is shorter than the header.
        NotMRCError: no 'MAP ' stamp or impossible dimensions.
        UnsupportedModeError: a mode other than 0, 1, 2, 6, 12.
        NotRegularFileError: not a regular file, or it cannot be opened.
    """
    path = Path(path)
    head = _read_head(path)
    if not head:
        raise EmptyMRCError(path, "empty file (0 bytes)")
    if len(head) >= 212 and head[208:211] != b"MAP":
        raise NotMRCError(path, "not an MRC file (no 'MAP ' stamp at byte 208)")
    if len(head) < HEADER_BYTES:
        raise TruncatedMRCError(path, f"file ends inside the MRC header ({len(head)} of {HEADER_BYTES} bytes)")
    order = ">" if head[212] == 0x11 else "<"
    nx, ny, nz, mode = (int(v) for v in np.frombuffer(head, dtype=f"{order}i4", count=4))
    next_bytes = int(np.frombuffer(head, dtype=f"{order}i4", count=1, offset=92)[0])
    mx, my = (int(v) for v in np.frombuffer(head, dtype=f"{order}i4", count=2, offset=28))
    with np.errstate(all="ignore"):
        cx, cy = (float(v) for v in np.frombuffer(head, dtype=f"{order}f4", count=2, offset=40))
        pixel = (cx / mx, cy / my) if mx > 0 and my > 0 else (0.0, 0.0)
    pixel_xy = pixel if all(np.isfinite(pixel)) and min(pixel) > 0 else None
    if not all(0 < n < _MAX_DIM for n in (nx, ny, nz)) or not 0 <= next_bytes < (1 << 31):
        raise NotMRCError(path, f"not a valid MRC header (nx={nx}, ny={ny}, nz={nz}, extended header {next_bytes})")
    if mode not in MODE_BYTES:
        raise UnsupportedModeError(path, f"MRC mode {mode} is not supported (use 0, 1, 2, 6 or 12)")
    if nx * ny > MAX_PIXELS:
        raise MicrographSizeError(path, f"too large: the header says {nx} x {ny} px, more than the {MAX_PIXELS // 2**20} Mpx a micrograph "
                                        "may have (emmae.io.mrc.MAX_PIXELS); bin it first (e.g. relion_image_handler --rescale_angpix)")
    return MrcLayout(nx=nx, ny=ny, nz=nz, mode=mode, extended_header_bytes=next_bytes, pixel_size_xy_A=pixel_xy)


def _read_head(path: Path) -> bytes:
    """The first ``HEADER_BYTES`` of a regular file, opened without blocking.

    Raises:
        NotRegularFileError: a FIFO, device or folder, or a file that cannot be opened
            (a symlink loop, no permission).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise NotRegularFileError(path, f"cannot be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(path, f"not a regular file ({_kind(info.st_mode)}); only regular files are read")
        chunks, got = [], 0
        while got < HEADER_BYTES:
            chunk = os.read(fd, HEADER_BYTES - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def check_dimensions(path: str | Path, layout: MrcLayout, diameter_px: float,
                     min_diameters: float = MIN_DIAMETERS, max_aspect: float = MAX_ASPECT) -> None:
    """Reject, from the header alone, a micrograph that cannot hold particles of ``diameter_px``.

    Called before anything is allocated for the micrograph: the working grid scales the
    micrograph's longer side to a fixed size, so a tiny or extremely elongated one would
    otherwise blow the particle (and every filter built on it) up to enormous sizes.

    Raises:
        MicrographSizeError: the shorter side is less than ``min_diameters`` particle
            diameters, or the longer side is more than ``max_aspect`` times the shorter.
    """
    short, long = sorted((layout.nx, layout.ny))
    if long > max_aspect * short:
        raise MicrographSizeError(
            path, f"absurdly elongated: {layout.nx} x {layout.ny} px (aspect ratio {long / short:.0f} > {max_aspect:g})"
        )
    if not (diameter_px > 0 and short >= min_diameters * diameter_px):
        raise MicrographSizeError(
            path, f"too small for the particle diameter: {layout.nx} x {layout.ny} px is less than {min_diameters:g} "
                  f"particle diameters ({diameter_px:.4g} px) across"
        )


def check_complete(path: str | Path) -> MrcLayout:
    """The daemon's gate: the header is valid and the data block is complete.

    Raises:
        IncompleteMRCError: the file is empty or shorter than its header declares: it
            is still being written (or was cut short); look again later.
        NotMRCError, UnsupportedModeError, MultiSectionError: the file will never be
            a usable micrograph.
    """
    try:
        return sized_layout(path)
    except (EmptyMRCError, TruncatedMRCError) as exc:
        raise IncompleteMRCError(Path(path), f"still being written: {exc.reason.removeprefix('truncated: ')}") from None


def sized_layout(path: str | Path) -> MrcLayout:
    """The header (:func:`read_layout`), checked against the file's size and for a single section.

    Raises:
        EmptyMRCError, TruncatedMRCError: the file is empty or shorter than its header declares.
        NotMRCError, UnsupportedModeError, NotRegularFileError: see :func:`read_layout`.
        MultiSectionError: more than one section.
    """
    path = Path(path)
    layout = read_layout(path)
    size = os.stat(path).st_size  # the data block must be on disk before anything is allocated for it
    if size < layout.expected_bytes:
        raise TruncatedMRCError(path, f"truncated: {size} of {layout.expected_bytes} bytes the header declares")
    if layout.nz != 1:
        raise MultiSectionError(path, f"a stack of {layout.nz} sections; expected one micrograph per file")
    return layout


def read_micrograph(path: str | Path, *, mmap: bool = True, layout: MrcLayout | None = None) -> Micrograph:
    """Read one micrograph as float32 ``data[row, col]`` with the header's pixel size.

    ``mmap=True`` maps the file instead of reading it into a buffer first, which
    saves a copy for large micrographs. ``layout``: the header as already parsed and
    checked against the file's size (:func:`check_complete`): not parsed or sized again.

    Raises:
        EmptyMRCError, TruncatedMRCError: the file is empty or shorter than declared.
        NotMRCError, CorruptMRCError: not an MRC file, or one mrcfile rejects.
        UnsupportedModeError: a mode other than 0, 1, 2, 6, 12.
        MultiSectionError: more than one section.
        NonFiniteDataError: NaN or infinite values.
    """
    path = Path(path)
    layout = layout if layout is not None else sized_layout(path)
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with opener(path, mode="r", permissive=False) as mrc:
            data = np.array(mrc.data.reshape(layout.ny, layout.nx), dtype=np.float32)
    except ValueError as exc:
        raise CorruptMRCError(path, f"mrcfile rejects the file: {exc}") from None
    if layout.mode in (2, 12):
        _check_finite(path, data)
    return Micrograph(path=path, data=data, pixel_size_xy_A=layout.pixel_size_xy_A)  # cella / mxyz, as mrcfile's voxel size


def _check_finite(path: Path, data: np.ndarray) -> None:
    with np.errstate(invalid="ignore", over="ignore"):  # +inf and -inf sum to NaN: found below, no warning
        total = data.sum(dtype=np.float64)
    if np.isfinite(total):
        return
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise NonFiniteDataError(path, f"{bad} NaN or infinite values in the data")


def write_micrograph(path: str | Path, data: np.ndarray, pixel_size_A: float | tuple[float, float] | None) -> None:
    """Write a 2-D array as an MRC file (mode from its dtype), atomically.

    Raises:
        ValueError: ``data`` is not 2-D or its dtype has no MRC mode.
        OutputError: the file could not be written.
    """
    if data.ndim != 2:
        raise ValueError(f"a micrograph is 2-D, got shape {data.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if pixel_size_A is not None:
                px, py = (pixel_size_A, pixel_size_A) if np.isscalar(pixel_size_A) else pixel_size_A
                mrc.voxel_size = (px, py, px)
