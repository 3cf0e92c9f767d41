"""k-means speed and agreement, NumPy against CuPy: the same ``emmae.runtime.kernels.kmeans`` code on both.

    python bench/kmeans.py [--repeats 5] [--bundle model.onnx]

The points are real encoder latents: synthetic micrographs are preprocessed and
encoded on the CPU with the bundle, and their latents pooled. Cases:

* ``session``: the session's fit (8 micrographs x 4000 latents, k = 5), as a stream fits it;
* ``assign``: every latent of one micrograph assigned to those centroids;
* ``large``: 400 000 points, k = 64 (the largest hierarchy level allowed), to show how each scales.

For each: the median seconds on each backend, the ratio, and how far the GPU fit agrees with
the CPU fit from the same seed (share of equal labels, relative inertia difference).
Results: ``bench/results/kmeans-<device>.json``; without a usable GPU only the CPU is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emmae.backend import CPU, Backend, get_backend, to_host
from emmae.config import EmmaeConfig
from emmae.errors import BackendError
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.kernels.kmeans import assign, kmeans
from emmae.runtime.picking.picker import encode, prepare
from emmae.synth import SynthParams, write_session

log = logging.getLogger("bench.kmeans")
RESULTS = Path(__file__).resolve().parent / "results"


def real_latents(bundle: Path | None, micrographs: int) -> list[np.ndarray]:
    """``[H*W, D]`` latents of ``micrographs`` synthetic 1024^2 micrographs, encoded on the CPU."""
    encoder = Encoder.open(bundle, backend=CPU)
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": 56.0}})
    with tempfile.TemporaryDirectory() as folder:
        paths = write_session(Path(folder), micrographs, SynthParams(shape=(1024, 1024), diameter_px=56.0), seed=7)
        maps = [to_host(encode(prepare(p, config, encoder), encoder).latents) for p in paths]
    return [m.reshape(-1, m.shape[-1]).astype(np.float32) for m in maps]


def timed(backend: Backend, repeats: int, call) -> tuple[float, object]:
    """Median seconds of ``call()`` over ``repeats`` runs after one warm-up, and its last result."""
    result = call()
    backend.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        backend.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def cases(latents: list[np.ndarray]) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    session = np.concatenate([m[rng.choice(len(m), 4000, replace=False)] for m in latents])
    pooled = np.concatenate(latents)
    large = pooled[rng.integers(len(pooled), size=400_000)] + rng.normal(0, 1e-3, (400_000, pooled.shape[1])).astype(np.float32)
    return {"session": (session, 5), "large": (large, 64)}


def bench(backends: list[Backend], latents: list[np.ndarray], repeats: int) -> list[dict]:
    rows = []
    for name, (points, k) in cases(latents).items():
        row: dict = {"case": name, "points": int(points.shape[0]), "dim": int(points.shape[1]), "k": k, "median_s": {}}
        fits = {}
        for backend in backends:
            x = backend.asarray(points)
            row["median_s"][backend.name], fits[backend.name] = timed(backend, repeats, lambda x=x, k=k: kmeans(x, k, seed=0))
        if "cupy" in fits:
            cpu, gpu = fits["numpy"], fits["cupy"]
            row["gpu_labels_equal"] = float((to_host(gpu.labels) == to_host(cpu.labels)).mean())
            row["gpu_inertia_rel_diff"] = abs(gpu.inertia - cpu.inertia) / cpu.inertia
        rows.append(row)
        if name == "session":  # every latent of one micrograph to the session's centroids
            rows.append(assign_row(backends, latents[0], fits, repeats))
    for row in rows:
        if "cupy" in row["median_s"]:
            row["cpu_over_gpu"] = row["median_s"]["numpy"] / row["median_s"]["cupy"]
    return rows


def assign_row(backends: list[Backend], micrograph: np.ndarray, fits: dict, repeats: int) -> dict:
    row: dict = {"case": "assign", "points": int(micrograph.shape[0]), "dim": int(micrograph.shape[1]), "k": 5, "median_s": {}}
    for backend in backends:
        on, centroids = backend.asarray(micrograph), fits[backend.name].centroids
        row["median_s"][backend.name], _ = timed(backend, repeats, lambda on=on, c=centroids: assign(on, c))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backends = [CPU]
    try:
        backends.append(get_backend("gpu"))
    except BackendError as exc:
        log.info("CPU only: %s", exc)
    rows = bench(backends, real_latents(args.bundle, 8), args.repeats)
    print(f"{'case':>8} {'points':>8} {'k':>3} {'CPU ms':>9} {'GPU ms':>9} {'CPU/GPU':>8} {'labels equal':>12} {'inertia diff':>12}")
    for r in rows:
        gpu = r["median_s"].get("cupy")
        print(f"{r['case']:>8} {r['points']:>8} {r['k']:>3} {r['median_s']['numpy'] * 1e3:9.1f} "
              + (f"{gpu * 1e3:9.1f} {r['cpu_over_gpu']:8.1f}" if gpu else f"{'-':>9} {'-':>8}")
              + (f" {r['gpu_labels_equal']:12.4f} {r['gpu_inertia_rel_diff']:12.2e}" if "gpu_labels_equal" in r else ""))
    device = backends[-1].device_name
    print(f"(medians over {args.repeats} runs; CPU: {os.cpu_count()} cores; GPU: {device if len(backends) > 1 else 'none'})")
    out = RESULTS / f"kmeans-{'cpu' if len(backends) == 1 else device.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device}
    out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
