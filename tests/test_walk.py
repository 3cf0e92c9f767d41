"""The walk of a micrograph from arrival to its STAR: its header is parsed once and its size checked once.

Admission parses the header and checks it against the file's size (``emmae.io.mrc.read_layout``
inside ``sized_layout`` / ``check_complete``) and the dimensions against the particle diameter
(``check_dimensions``); the job carries the result, so reading, picking and writing never do
either again. Counted for a stream (arrival -> gate -> job -> pipeline -> STAR) and a batch.
"""

from __future__ import annotations

import collections

import pytest
import starfile

from emmae.config import validate_config
from emmae.io import mrc
from emmae.runtime import jobs
from emmae.runtime.commands import pick as cli
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.stream.daemon import Daemon, StopFlag, run
from emmae.synth import SynthParams, write_session

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)


@pytest.fixture
def counted(monkeypatch):
    """Calls of the header parse and of the dimension check, per file name."""
    calls: dict[str, collections.Counter] = {"header": collections.Counter(), "dimensions": collections.Counter()}
    real_layout, real_dimensions = mrc.read_layout, jobs.check_dimensions

    def read_layout(path):
        calls["header"][str(path).rsplit("/", 1)[-1]] += 1
        return real_layout(path)

    def check_dimensions(path, layout, diameter_px, *args):
        calls["dimensions"][str(path).rsplit("/", 1)[-1]] += 1
        return real_dimensions(path, layout, diameter_px, *args)

    monkeypatch.setattr(mrc, "read_layout", read_layout)
    monkeypatch.setattr(jobs, "check_dimensions", check_dimensions)
    return calls


def test_a_streamed_micrograph_is_parsed_and_sized_once(tmp_path, counted):
    watch, out = tmp_path / "watch", tmp_path / "out"
    mics = write_session(watch, 3, PARAMS, seed=21)
    config = validate_config({"preprocess": {"diameter_px": 24.0}, "stream": {"settle_s": 0.0, "poll_interval_s": 0.05, "poll": "always"}})
    daemon = Daemon(watch, out, config, Encoder.open(threads=1))
    try:
        run(daemon, StopFlag(), once=True)
        assert daemon.journal.counts() == {"picked": 3}
    finally:
        daemon.release()
    names = [m.name for m in mics]
    assert dict(counted["header"]) == dict.fromkeys(names, 1)
    assert dict(counted["dimensions"]) == dict.fromkeys(names, 1)
    assert len(starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]) == 3


def test_a_batch_micrograph_is_parsed_and_sized_once(tmp_path, counted):
    mics = write_session(tmp_path / "mics", 3, PARAMS, seed=22)
    assert cli.main([str(tmp_path / "mics"), "--diameter-px", "24", "--out", str(tmp_path / "out"), "--threads", "1", "-q"]) == cli.EXIT_OK
    names = [m.name for m in mics]
    assert dict(counted["header"]) == dict.fromkeys(names, 1)  # the session's samples are read once too
    assert dict(counted["dimensions"]) == dict.fromkeys(names, 1)
