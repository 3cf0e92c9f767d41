"""emmae-stream --adapt: fine-tune on the first micrographs in a child process, switch once, re-pick; survive kill -9."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import starfile

from emmae.runtime.commands import stream as daemon
from emmae.runtime.stream.adapter import FOLDER, model_id
from emmae.runtime.stream.journal import Journal
from emmae.synth import SynthParams, write_session

pytest.importorskip("torch")
pytest.importorskip("onnx")

PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=2.0, snr=0.3)


def _args(watch: Path, out: Path, bundle: Path, *more: str) -> list[str]:
    return ["--watch", str(watch), "--out", str(out), "--model", str(bundle), "--diameter-px", "24", "--settle-s", "0",
            "--poll-interval-s", "0.1", "--progress", "plain", "--set", "preprocess.grid_px=256", "--adapt", "2", *more]


def _one_set_of_picks(out: Path, mics: list[Path], model: str) -> None:
    journal = Journal(out)
    picked = journal.picked()
    assert sorted(Path(e.path).name for e in picked) == [m.name for m in mics]
    assert {e.model for e in picked} == {model}
    assert journal.adaptation().state == "done"
    journal.close()
    assert sorted(p.name for p in out.rglob("*_autopick.star")) == [f"{m.stem}_autopick.star" for m in mics]
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(os.path.relpath(m, m.parent.parent) for m in mics)


def test_adapt_switches_once_and_repicks(tiny_bundle, tmp_path, caplog):
    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 3, PARAMS, seed=2)
    with caplog.at_level(logging.INFO, logger="emmae.stream"):
        assert daemon.main(_args(watch, out, tiny_bundle, "--adapt-epochs", "1", "--once")) == 0
    adapted = out / FOLDER / "adapted.onnx"
    switches = [r for r in caplog.records if "switched to the adapted model" in r.getMessage()]
    assert len(switches) == 1 and "picked again" in switches[0].getMessage()
    picks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("picked ")]
    assert len(picks) > len(mics)  # the old model's picks were made again
    _one_set_of_picks(out, mics, model_id(adapted))
    record = Journal(out).adaptation()
    assert [Path(p).name for p in record.micrographs] == [m.name for m in mics[:2]]  # the first two picked
    assert "3 picked, 0 failed" in picks[-1]  # the status counts each micrograph once
    # a restart keeps the adapted model and has nothing left to do
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="emmae.stream"):
        assert daemon.main(_args(watch, out, tiny_bundle, "--adapt-epochs", "1", "--once")) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("picked ") or "adapting" in r.getMessage()]
    _one_set_of_picks(out, mics, model_id(adapted))


def test_adapt_then_mark_keeps_the_old_picks(tiny_bundle, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 2, PARAMS, seed=4)
    assert daemon.main(_args(watch, out, tiny_bundle, "--adapt-epochs", "1", "--adapt-then", "mark", "--once")) == 0
    journal = Journal(out)
    assert journal.adaptation().state == "done"
    assert {e.model for e in journal.picked()} == {model_id(tiny_bundle)}  # picked before the switch, and left so
    assert len(journal.picked()) == len(mics)


def _stream(args: list[str]) -> subprocess.Popen:
    code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_9_during_adaptation_then_restart(tiny_bundle, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 3, PARAMS, seed=6)
    first = _stream(_args(watch, out, tiny_bundle, "--adapt-epochs", "1000", "--adapt-budget-s", "0"))  # trains until killed
    progress, deadline = out / FOLDER / "progress.json", time.monotonic() + 120
    while time.monotonic() < deadline:
        state = json.loads(progress.read_text()) if progress.is_file() else {}
        if state.get("stage") == "train" and (out / FOLDER / "work" / "checkpoint.pt").is_file():
            break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail(f"the adaptation never started training:\n{first.communicate()[0]}")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    first.stdout.close()
    child = state["pid"]
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the adaptation outlived its daemon"
    assert Journal(out).adaptation().state == "running"
    second = _stream(_args(watch, out, tiny_bundle, "--adapt-epochs", "2", "--once"))
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert "resuming the adaptation" in output and output.count("switched to the adapted model") == 1
    _one_set_of_picks(out, mics, model_id(out / FOLDER / "adapted.onnx"))
