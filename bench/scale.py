"""Picking on a Dask cluster: throughput with 1 and 2 local worker processes, and the scheduler's overhead per micrograph.

    python bench/scale.py [--micrographs 16] [--size 1024]

Synthetic micrographs (1024^2 by default) are picked three ways on this machine, each
after a warm-up micrograph: one process (``emmae-pick``, all cores), a local Dask
cluster of 1 worker process (all cores) and one of 2 worker processes (the cores
shared out). Cluster start-up (workers opening their encoder) is timed apart.

The overhead per micrograph is measured with a no-op picker: the same tasks, with the
same arguments and a result of the size of a real one, through the same client loop,
on 1 worker, so what is left is the scheduler's and the transport's cost. Its ratio
to one micrograph's pick time says how many workers one scheduler can keep busy:
with overhead ``o`` and pick time ``t``, ``W`` workers run at about
``min(1, t / (W * o))`` of their speed (the scheduler serialises the bookkeeping).
Writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emmae.runtime.commands import pick as cli
from emmae.runtime import distributed as dist
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.picker import encode, fit, pick, prepare
from emmae.synth import SynthParams, write_session

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.scale")


def noop_task(path: str, name: str, stem: str, out: str, session_json: str | None, payload: int) -> np.ndarray:
    """What a pick task costs the cluster, without the pick: the same arguments in, a result of the same size out."""
    return np.zeros(payload, dtype=np.uint8)


def single_process(paths: list[Path], out: Path, threads: int) -> float:
    """Seconds per micrograph of ``emmae-pick`` (after a warm-up micrograph)."""
    common = ["--diameter-px", "40", "--threads", str(threads), "-q"]
    assert cli.main([str(paths[0]), "--out", str(out / "warm"), *common]) == 0
    start = time.perf_counter()
    assert cli.main([*map(str, paths), "--out", str(out / "single"), *common]) == 0
    return (time.perf_counter() - start) / len(paths)


def on_cluster(paths: list[Path], out: Path, workers: int, threads: int) -> dict:
    """Start-up seconds and seconds per micrograph on a local cluster of ``workers`` processes."""
    args = cli.build_parser().parse_args(["--diameter-px", "40", "-q"])
    config = cli._config(args)
    jobs, _ = cli.admit_all(cli.collect_inputs([str(p) for p in paths], config), config)
    start = time.perf_counter()
    client = dist.connect(None, workers, threads)
    try:
        executor = dist.DaskExecutor(client, config)
        client.run(lambda: None)
        startup = time.perf_counter() - start
        with OutputFolder.open(out / f"warm-{workers}") as warm:
            cli.pick_all(jobs[:workers], [], executor, config, warm, ["bench"], executor.patch_px)
        start = time.perf_counter()
        with OutputFolder.open(out / f"cluster-{workers}") as folder:
            status = cli.pick_all(jobs, [], dist.DaskExecutor(client, config), config, folder, ["bench"], executor.patch_px)
        seconds = time.perf_counter() - start
    finally:
        dist.close(client)
    assert status == cli.EXIT_OK
    return {"workers": workers, "threads_per_worker": threads, "startup_s": startup, "s_per_micrograph": seconds / len(paths),
            "micrographs_per_hour": 3600 * len(paths) / seconds}


def overhead(paths: list[Path], out: Path, payload: int, repeats: int) -> dict:
    """Seconds per task of the no-op picker on 1 worker: median over ``repeats`` rounds of len(paths) tasks."""
    from distributed import as_completed

    client = dist.connect(None, 1, 1)
    try:
        rounds = []
        for _ in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            futures = [client.submit(noop_task, str(p), p.stem, p.stem, str(out), "x" * 4000, payload, pure=False) for p in paths]
            for future in as_completed(futures):
                future.result()
            rounds.append((time.perf_counter() - start) / len(paths))
    finally:
        dist.close(client)
    return {"s_per_task": statistics.median(rounds[1:]), "rounds_s_per_task": rounds[1:], "payload_bytes": payload}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micrographs", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_session(tmp / "session", args.micrographs, SynthParams(shape=(args.size, args.size), diameter_px=40.0, pixel_size_A=1.0), seed=3)
        single = single_process(paths, tmp, cores)
        clusters = [on_cluster(paths, tmp, 1, cores), on_cluster(paths, tmp, 2, max(1, cores // 2))]
        config = cli._config(cli.build_parser().parse_args(["--diameter-px", "40"]))
        encoder = Encoder.open(None, threads=cores)
        encoded = encode(prepare(paths[0], config, encoder), encoder)
        payload = len(pickle.dumps(pick(encoded, config, encoder, fit([encoded], config, encoder))))  # a real result's size
        noop = overhead(paths, tmp, payload, args.repeats)
    ratio = noop["s_per_task"] / single
    record = {
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "micrographs": args.micrographs, "size_px": args.size,
        "single_process": {"s_per_micrograph": single, "micrographs_per_hour": 3600 / single},
        "clusters": clusters,
        # W workers run at about min(1, t / (W o)) of their speed: at least 90 % while W <= t / (0.9 o)
        "overhead": noop | {"ratio_to_pick": ratio, "workers_at_90_percent": int(single / (0.9 * noop["s_per_task"]))},
    }
    print(f"{'run':<28} {'s/micrograph':>13} {'per hour':>9}")
    print(f"{'one process':<28} {single:13.3f} {3600 / single:9.0f}")
    for c in clusters:
        label = f"{c['workers']} worker(s) x {c['threads_per_worker']} threads"
        print(f"{label:<28} {c['s_per_micrograph']:13.3f} {c['micrographs_per_hour']:9.0f}   (start-up {c['startup_s']:.1f} s)")
    print(f"scheduler overhead per micrograph (no-op picker, {payload} B result): {noop['s_per_task'] * 1e3:.2f} ms = "
          f"{100 * ratio:.2f} % of a pick; one scheduler keeps ~{record['overhead']['workers_at_90_percent']} such workers at >= 90 %")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
