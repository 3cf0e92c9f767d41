"""A few hundred mutated MRC headers through the daemon's path (seeded, seconds).

Each mutated file is scanned and gated by a daemon session exactly as a landing
micrograph would be: it is either recorded as failed with a reason, or handed on.
What is handed on is then read as the pipeline's first stage reads it, and its
working-grid geometry must stay bounded (nothing sized by a lying header); each
distinct accepted shape is also preprocessed. Nothing may raise anything but a
:class:`~emmae.errors.MicrographError` with a reason.
"""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest

from emmae.errors import MicrographError
from emmae.io.mrc import read_micrograph, write_micrograph
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.preprocess import plan
from tests.test_stream_hardening import session

CASES = 300
SEED = 20261202
DIAMETER_PX = 24.0
INT_FIELDS = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "mx": 28, "my": 32, "next": 92}
FLOAT_FIELDS = {"cella_x": 40, "cella_y": 44}
INTS = [0, 1, 2, 3, 5, 7, 64, 71, 72, 127, 128, 129, 4096, (1 << 20) - 1, 1 << 20, -1, -(2**31), 2**31 - 1]
FLOATS = [0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 512.0]


def _mutate(base: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(base)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 5))
        if kind == 0:
            field = str(rng.choice(list(INT_FIELDS)))
            value = int(rng.choice(INTS)) if rng.random() < 0.8 else int(rng.integers(-(2**31), 2**31 - 1))
            struct.pack_into("<i", data, INT_FIELDS[field], value)
            done.append(f"{field}={value}")
        elif kind == 1:
            field = str(rng.choice(list(FLOAT_FIELDS)))
            value = float(rng.choice(FLOATS))
            struct.pack_into("<f", data, FLOAT_FIELDS[field], value)
            done.append(f"{field}={value}")
        elif kind == 2:
            for _ in range(int(rng.integers(1, 9))):
                at = int(rng.integers(0, 1024))
                data[at] = int(rng.integers(0, 256))
            done.append("bytes flipped")
        elif kind == 3:
            at = int(rng.integers(208, 216))
            data[at] = int(rng.integers(0, 256))
            done.append(f"stamp byte {at}")
        else:
            cut = int(rng.integers(0, len(data) + 4096))
            data = data[:cut] if cut <= len(data) else data + bytes(rng.integers(0, 256, cut - len(data), dtype=np.uint8))
            done.append(f"length {cut}")
    return bytes(data), ", ".join(done)


@pytest.mark.filterwarnings("ignore:MRC file is .* bytes larger than expected:RuntimeWarning")  # extra bytes after the data: read
def test_a_few_hundred_mutated_headers_are_each_handed_on_or_failed_with_a_reason(tmp_path):
    rng = np.random.default_rng(SEED)
    base_path = tmp_path / "base.mrc"
    write_micrograph(base_path, rng.normal(size=(128, 128)).astype(np.float32), 4.0)
    base = base_path.read_bytes()
    watch = tmp_path / "session"
    watch.mkdir()
    mutations = {}
    for i in range(CASES):
        data, what = _mutate(base, rng)
        (watch / f"fuzz_{i:03d}.mrc").write_bytes(data)
        mutations[f"fuzz_{i:03d}.mrc"] = what
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with session(watch, tmp_path / "out", f"preprocess.diameter_px={DIAMETER_PX}", "stream.stale_after_s=0.2") as live:
        live.scan()
        time.sleep(0.3)
        live.scan()  # incomplete files have now waited their (short) stale_after_s
        failed = {e.path: e.reason for e in live.journal.failed()}
        handed_on = sorted(job.path for job in live.schedule.ready)
    assert set(failed) | {p.name for p in handed_on} == set(mutations)  # every case decided
    assert not set(failed) & {p.name for p in handed_on}
    assert all(reason and reason.strip() for reason in failed.values())
    assert len(failed) > CASES // 3 and handed_on  # the mutations do break headers, and some survive

    from emmae.runtime.picking.picker import model_preprocess_config

    trained = model_preprocess_config(live.config, _Bundle())
    shapes = {}
    for path in handed_on:
        try:
            mic = read_micrograph(path)  # the pipeline's read: all of the data, bounded by the file's size
        except MicrographError as exc:
            assert exc.reason, mutations[path.name]
            continue
        transform, _ = plan(mic.data.shape, trained, DIAMETER_PX)
        assert max(transform.padded_shape) <= trained.grid_px + trained.tile_px, (path.name, mutations[path.name])
        assert DIAMETER_PX * transform.scale <= trained.grid_px / 3 + 1e-6, (path.name, mutations[path.name])
        shapes.setdefault(mic.data.shape, mic)
    from emmae.runtime.picking.preprocess import preprocess

    for mic in shapes.values():
        grid = preprocess(mic.data, trained, DIAMETER_PX)
        assert np.isfinite(np.asarray(grid.image)).all()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB"
    assert time.monotonic() - start < 60


class _Bundle:
    """The bundled model's preprocessing settings, without opening the model."""

    def __init__(self) -> None:
        from emmae.runtime.picking.bundle import open_bundle

        if not default_bundle_path().is_file():
            pytest.skip("no bundled model")
        self.bundle = open_bundle(default_bundle_path())
