"""Picking on a Dask cluster: the same outputs as one process, and nothing lost or doubled when a worker dies."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

pytest.importorskip("distributed")

from emmae.runtime.commands import pick as cli  # noqa: E402
from emmae.runtime import distributed as dist  # noqa: E402
from emmae.runtime.outputs import OutputFolder  # noqa: E402
from emmae.synth import SynthParams, write_session  # noqa: E402

PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)
COMMON = ["--diameter-px", "24", "--threads", "1", "-q"]


def _picks(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for star in sorted(out.rglob("*_autopick.star")):
        table = starfile.read(star)
        found[star.name] = np.zeros((0, 2)) if len(table) == 0 else table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    return found


def test_two_local_workers_give_the_single_process_outputs(tmp_path):
    mics = write_session(tmp_path / "session", 10, PARAMS, seed=11)  # more than the 8 session samples
    assert cli.main([str(tmp_path / "session"), "--out", str(tmp_path / "one"), *COMMON]) == 0
    assert cli.main([str(tmp_path / "session"), "--out", str(tmp_path / "two"), "--workers", "2", *COMMON]) == 0
    one, two = _picks(tmp_path / "one"), _picks(tmp_path / "two")
    assert sorted(one) == sorted(two) == sorted(f"{m.stem}_autopick.star" for m in mics)
    for name in one:
        assert one[name].shape == two[name].shape and len(one[name]) > 0
        np.testing.assert_allclose(one[name], two[name], atol=1e-3)
    for index in ("autopick.star", "particles.star", "micrographs.star"):
        a = starfile.read(tmp_path / "one" / index, always_dict=True)
        b = starfile.read(tmp_path / "two" / index, always_dict=True)
        assert a.keys() == b.keys()
        for block in a:
            assert len(a[block]) == len(b[block])
            assert list(a[block].iloc[:, 0]) == [str(v).replace("/two/", "/one/") for v in b[block].iloc[:, 0]]
    assert (tmp_path / "two" / "emmae-session.json").is_file()


def test_a_worker_killed_mid_run_loses_nothing(tmp_path):
    mics = write_session(tmp_path / "session", 8, PARAMS, seed=12)
    config = cli._config(cli.build_parser().parse_args(COMMON))
    jobs, _ = cli.admit_all(cli.collect_inputs([str(tmp_path / "session")], config), config)
    out = tmp_path / "out"
    client = dist.connect(None, 2, threads=1)
    try:
        victim = next(iter(client.run(os.getpid).values()))
        killed = threading.Event()

        def kill_after_first_output() -> None:
            deadline = time.monotonic() + 120
            while not list(out.rglob("*_autopick.star")) and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(victim, signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_after_first_output, daemon=True)
        killer.start()
        with OutputFolder.open(out) as outputs:
            executor = dist.DaskExecutor(client, config)
            status = cli.pick_all(jobs, [], executor, config, outputs, ["test"], executor.patch_px)
        killer.join(timeout=5)
    finally:
        dist.close(client)
    assert killed.is_set()
    assert status == cli.EXIT_OK, (out / "failed.txt").read_text() if (out / "failed.txt").exists() else status
    assert sorted(_picks(out)) == sorted(f"{m.stem}_autopick.star" for m in mics)
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(str(m) for m in mics)  # each exactly once
    assert not [p for p in out.rglob("*") if p.name.startswith(".emmae-tmp-")]


def test_cluster_options_need_one_of_scheduler_or_workers():
    with pytest.raises(cli.ConfigError, match="either --scheduler"):
        dist.connect(None, None)
    with pytest.raises(cli.ConfigError, match="at least 1"):
        dist.connect(None, 0)


def test_stream_on_a_cluster_survives_a_worker_death(tmp_path):
    import subprocess
    import sys

    from distributed import Client, LocalCluster

    from emmae.runtime.stream.journal import Journal

    watch, out = tmp_path / "session", tmp_path / "out"
    mics = write_session(watch, 6, PARAMS, seed=13)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        victim = next(iter(client.run(os.getpid).values()))
        code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
        args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.1",
                "--scheduler", cluster.scheduler_address, "--once", "--progress", "plain"]
        daemon = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not list(out.rglob("*_autopick.star")) and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        output, _ = daemon.communicate(timeout=180)
    assert daemon.returncode == 0, output
    journal = Journal(out)
    assert sorted(Path(e.path).name for e in journal.picked()) == [m.name for m in mics]
    assert journal.counts() == {"picked": len(mics)}
    journal.close()
    assert sorted(_picks(out)) == sorted(f"{m.stem}_autopick.star" for m in mics)
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    assert sorted(index["rlnMicrographName"]) == sorted(os.path.relpath(m, m.parent.parent) for m in mics)
