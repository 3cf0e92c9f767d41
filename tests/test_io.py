from __future__ import annotations

import errno
import os

import mrcfile
import numpy as np
import pandas as pd
import pytest

from emmae.errors import (
    CorruptMRCError,
    EmptyMRCError,
    IncompleteMRCError,
    MultiSectionError,
    NonFiniteDataError,
    NotMRCError,
    OutputError,
    TruncatedMRCError,
    UnsupportedModeError,
)
from emmae.io import star as star_io
from emmae.io.atomic import TEMP_PREFIX, write_bytes_atomic
from emmae.io.mrc import check_complete, read_layout, read_micrograph, write_micrograph


def _write_raw(path, data, voxel=None, ispg=None):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel is not None:
            mrc.voxel_size = voxel
        if ispg is not None:
            mrc.header.ispg = ispg


@pytest.mark.parametrize(
    ("mode", "dtype"), [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16), (12, np.float16)]
)
def test_modes_read_as_float32(tmp_path, mode, dtype):
    data = (np.arange(24 * 16).reshape(24, 16) % 100).astype(dtype)
    path = tmp_path / f"m{mode}.mrc"
    _write_raw(path, data, voxel=(1.25, 1.25, 1.25))
    mic = read_micrograph(path)
    assert read_layout(path).mode == mode
    assert mic.data.dtype == np.float32 and mic.data.shape == (24, 16)
    np.testing.assert_array_equal(mic.data, data.astype(np.float32))
    assert mic.pixel_size_A == pytest.approx(1.25)


def test_rows_are_y_and_columns_are_x(tmp_path):
    data = np.zeros((20, 30), np.float32)
    data[3, 17] = 1.0  # row 3 = y, column 17 = x
    path = tmp_path / "xy.mrc"
    _write_raw(path, data)
    layout = check_complete(path)
    assert (layout.nx, layout.ny) == (30, 20)
    assert tuple(np.argwhere(read_micrograph(path).data == 1)[0]) == (3, 17)


def test_single_section_3d_and_no_mmap(tmp_path):
    data = np.random.default_rng(0).random((1, 12, 10)).astype(np.float32)
    path = tmp_path / "one.mrc"
    _write_raw(path, data)
    for mmap in (True, False):
        mic = read_micrograph(path, mmap=mmap)
        np.testing.assert_array_equal(mic.data, data[0])


def test_anisotropic_pixel_size_and_missing_pixel_size(tmp_path):
    path = tmp_path / "aniso.mrc"
    _write_raw(path, np.zeros((8, 8), np.float32), voxel=(4.56, 4.40, 1.0))
    mic = read_micrograph(path)
    assert mic.pixel_size_xy_A == pytest.approx((4.56, 4.40), rel=1e-6)
    assert mic.pixel_size_A == pytest.approx(np.sqrt(4.56 * 4.40), rel=1e-6)
    bare = tmp_path / "bare.mrc"
    _write_raw(bare, np.zeros((8, 8), np.float32))
    assert read_micrograph(bare).pixel_size_A is None


def test_write_micrograph_round_trip(tmp_path):
    data = np.random.default_rng(1).normal(size=(33, 47)).astype(np.float32)
    path = tmp_path / "w.mrc"
    write_micrograph(path, data, 0.83)
    mic = read_micrograph(path)
    np.testing.assert_array_equal(mic.data, data)
    assert mic.pixel_size_A == pytest.approx(0.83, rel=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mrc"
    path.touch()
    with pytest.raises(EmptyMRCError, match="empty file"):
        read_micrograph(path)
    with pytest.raises(IncompleteMRCError, match="still being written"):
        check_complete(path)


def test_not_an_mrc_file(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_bytes(b"this is not a micrograph\n" * 100)
    with pytest.raises(NotMRCError, match="no 'MAP ' stamp"):
        read_micrograph(path)
    with pytest.raises(NotMRCError):
        check_complete(path)


def test_impossible_dimensions(tmp_path):
    path = tmp_path / "dims.mrc"
    _write_raw(path, np.zeros((4, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(-5).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(NotMRCError, match="nx=-5"):
        read_micrograph(path)


def test_truncated_data_block(tmp_path):
    path = tmp_path / "cut.mrc"
    _write_raw(path, np.ones((64, 64), np.float32))
    full = path.read_bytes()
    path.write_bytes(full[:-100])
    with pytest.raises(TruncatedMRCError, match=f"truncated: {len(full) - 100} of {len(full)} bytes"):
        read_micrograph(path)
    with pytest.raises(IncompleteMRCError, match="still being written") as info:
        check_complete(path)
    assert type(info.value) is IncompleteMRCError


def test_truncated_header(tmp_path):
    path = tmp_path / "head.mrc"
    _write_raw(path, np.ones((8, 8), np.float32))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TruncatedMRCError, match="ends inside the MRC header"):
        read_micrograph(path)
    with pytest.raises(IncompleteMRCError, match="still being written"):
        check_complete(path)


def test_file_growing_in_chunks_passes_only_when_whole(tmp_path):
    source = tmp_path / "src.mrc"
    _write_raw(source, np.random.default_rng(2).random((128, 96)).astype(np.float32))
    payload = source.read_bytes()
    target = tmp_path / "growing.mrc"
    with open(target, "wb") as handle:
        for start in range(0, len(payload), 4096):
            handle.write(payload[start : start + 4096])
            handle.flush()
            if start + 4096 < len(payload):
                with pytest.raises(IncompleteMRCError):
                    check_complete(target)
    assert check_complete(target).nx == 96


def test_unsupported_mode(tmp_path):
    path = tmp_path / "mode4.mrc"
    _write_raw(path, np.zeros((8, 8), np.complex64))
    with pytest.raises(UnsupportedModeError, match="mode 4 is not supported"):
        read_micrograph(path)
    with pytest.raises(UnsupportedModeError):
        check_complete(path)


def test_stack_of_sections(tmp_path):
    path = tmp_path / "stack.mrc"
    _write_raw(path, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(MultiSectionError, match="a stack of 3 sections"):
        read_micrograph(path)
    with pytest.raises(MultiSectionError):
        check_complete(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data(tmp_path, bad):
    path = tmp_path / "nan.mrc"
    _write_raw(path, np.ones((16, 16), np.float32))
    raw = bytearray(path.read_bytes())
    for row, col in ((5, 7), (9, 2)):  # patch the data block directly (mrcfile warns on writing NaN)
        start = 1024 + 4 * (row * 16 + col)
        raw[start : start + 4] = np.float32(bad).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(NonFiniteDataError, match="2 NaN or infinite values"):
        read_micrograph(path)


def test_corrupt_header_rejected_by_mrcfile(tmp_path):
    path = tmp_path / "corrupt.mrc"
    _write_raw(path, np.zeros((8, 8), np.float32))
    raw = bytearray(path.read_bytes())
    raw[212:216] = b"\x00\x00\x00\x00"  # machine stamp cleared: mrcfile refuses in strict mode
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptMRCError, match="mrcfile rejects"):
        read_micrograph(path)


def test_star_round_trip_and_atomicity(tmp_path):
    path = tmp_path / "picks.star"
    coords = pd.DataFrame({"rlnCoordinateX": [10.5, 20.25], "rlnCoordinateY": [30.0, 40.75]})
    star_io.write_star(path, coords)
    back = star_io.read_star(path)[""]
    pd.testing.assert_frame_equal(back, coords)
    star_io.write_star(path, {"optics": pd.DataFrame({"rlnOpticsGroup": [1]}), "particles": coords})
    blocks = star_io.read_star(path)
    assert set(blocks) == {"optics", "particles"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.star"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "picks.star"
    old = pd.DataFrame({"rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0]})
    star_io.write_star(path, old)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(star_io.starfile, "write", disk_full)
    with pytest.raises(OutputError, match="No space left on device"):
        star_io.write_star(path, pd.DataFrame({"rlnCoordinateX": [9.0], "rlnCoordinateY": [9.0]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.star"]
    monkeypatch.undo()
    pd.testing.assert_frame_equal(star_io.read_star(path)[""], old)


def test_unwritable_folder(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        write_bytes_atomic(tmp_path / "missing-folder" / "x.star", b"data_\n")


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_bytes_atomic(tmp_path / "a.star", b"data_\n")
    (tmp_path / "plain.star").write_bytes(b"data_\n")  # what an ordinary write gets (mkstemp alone gives 0600)
    assert (tmp_path / "a.star").stat().st_mode & 0o777 == (tmp_path / "plain.star").stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporaries_are_removed(tmp_path):
    from emmae.io.atomic import TEMP_PREFIX, remove_stale_temporaries

    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f"{TEMP_PREFIX}a.star", tmp_path / "sub" / f"{TEMP_PREFIX}b.npz"]
    for path in [*stale, tmp_path / "keep.star"]:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.star"]
