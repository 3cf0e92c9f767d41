"""Encoder speed per micrograph (256 tiles of 64^2) for every bundle variant, onnxruntime.

    python bench/encode.py [BUNDLE ...] [--repeats 5] [--batches 8 256] [--reference-arch] [--gpu]

With no bundles, times every ``emmae/models/*.onnx``. ``--reference-arch`` also
exports (needs torch) and times a random-weight encoder of the reference size
(width 192, depth 14: ~0.73 TFLOP per micrograph). For each: the FLOP count, the
median seconds per micrograph, the achieved rate, and its fraction of this
machine's measured float32 matrix-multiply rate (NumPy BLAS, all cores; CuPy for the
GPU rows). Each bundle's 256 tiles go through in runs of each ``--batches`` size (the
runtime's ``model.batch_tiles``: 8 by default on the CPU, 256 on a GPU), so run sizes are
compared in one run on the same tiles. ``--gpu`` times each bundle on onnxruntime's CUDA provider too, in the same
run. The provider really used is read from the session. Results:
``bench/results/encode-cpu.json``, or ``encode-gpu.json`` with ``--gpu``.
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
import onnxruntime as ort

from emmae.memory import retain_freed_memory
from emmae.runtime.picking.bundle import default_bundle_path, encoder_flops, open_bundle

log = logging.getLogger("bench.encode")
RESULTS = Path(__file__).resolve().parent / "results"
TILES = 256


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GEMM rate of this machine in FLOP/s (median)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples)


def gpu_matmul_rate(n: int = 8192, repeats: int = 5) -> float:
    """Measured float32 GEMM rate of the GPU in FLOP/s (CuPy, median)."""
    import cupy

    a = cupy.random.random((n, n), dtype=cupy.float32)
    b = cupy.random.random((n, n), dtype=cupy.float32)
    samples = []
    for _ in range(repeats + 1):
        cupy.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        a @ b
        cupy.cuda.get_current_stream().synchronize()
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples[1:])


def cuda_session(path: Path) -> ort.InferenceSession | None:
    """A session on onnxruntime's CUDA provider, or None when that provider does not really run."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return session if session.get_providers()[0] == "CUDAExecutionProvider" else None


def time_session(session: ort.InferenceSession, tiles: np.ndarray, repeats: int, batch: int) -> float:
    """Median seconds to encode ``tiles`` in runs of ``batch``."""
    name = session.get_inputs()[0].name

    def encode() -> None:
        for i in range(0, len(tiles), batch):
            session.run(None, {name: tiles[i : i + batch]})

    encode()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def reference_arch_graph(folder: Path) -> tuple[Path, dict] | None:
    try:
        import torch

        from emmae.export.onnx import export_fp32
        from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder
    except ImportError:
        log.info("torch is not installed: skipping the reference-size encoder")
        return None
    torch.manual_seed(0)
    arch = MAEArchitecture()
    return export_fp32(MaskedAutoencoder(arch).eval(), folder / "reference-arch.onnx"), arch.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 256], help="tiles per encoder run, each timed (default 8 256)")
    parser.add_argument("--reference-arch", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="also time onnxruntime's CUDA provider (host tiles in, host latents out)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    bundles = args.bundles or sorted(default_bundle_path().parent.glob("*.onnx"))
    peak = matmul_rate()
    log.info("float32 matmul rate: %.1f GFLOP/s", peak / 1e9)
    gpu_peak = gpu_matmul_rate() if args.gpu else None
    tiles = np.random.default_rng(0).normal(size=(TILES, 1, 64, 64)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        graphs = [(path, open_bundle(path).info.arch, open_bundle(path).info.precision) for path in bundles]
        if args.reference_arch:
            extra = reference_arch_graph(Path(folder))
            if extra:
                graphs.append((extra[0], extra[1], "fp32 (reference size, random weights)"))
        for path, arch, precision in graphs:
            sessions = [(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), peak)]
            if args.gpu:
                cuda = cuda_session(path)
                if cuda is None:
                    log.warning("%s: onnxruntime's CUDA provider does not run here", path.name)
                else:
                    sessions.append((cuda, gpu_peak))
            for (session, rate), batch in ((s, b) for s in sessions for b in args.batches):
                seconds = time_session(session, tiles, args.repeats, batch)
                flops = encoder_flops(arch) * TILES
                rows.append({
                    "model": path.name, "precision": precision, "provider": session.get_providers()[0], "batch_tiles": batch,
                    "embed_dim": arch["embed_dim"], "depth": arch["depth"], "tflop_per_micrograph": flops / 1e12,
                    "seconds_per_micrograph": seconds, "gflop_per_s": flops / seconds / 1e9, "fraction_of_matmul_rate": flops / seconds / rate,
                })
    print_table(rows, peak, gpu_peak)
    out = args.output or RESULTS / ("encode-gpu.json" if args.gpu else "encode-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__, "numpy": np.__version__,
               "gpu": gpu_name() if args.gpu else None}
    out.write_text(json.dumps({"machine": machine, "matmul_gflop_per_s": peak / 1e9,
                               "gpu_matmul_gflop_per_s": gpu_peak / 1e9 if gpu_peak else None, "tiles_per_micrograph": TILES, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


def gpu_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def print_table(rows: list[dict], peak: float, gpu_peak: float | None = None) -> None:
    print(f"{'model':<24} {'provider':<22} {'precision':<38} {'batch':>5} {'D x depth':>10} {'TFLOP':>7} {'s/micrograph':>13} {'GFLOP/s':>8} {'of matmul':>9}")
    for r in rows:
        print(
            f"{r['model']:<24} {r['provider']:<22} {r['precision']:<38} {r['batch_tiles']:>5} {r['embed_dim']:>5} x {r['depth']:<2} {r['tflop_per_micrograph']:7.3f} "
            f"{r['seconds_per_micrograph']:13.3f} {r['gflop_per_s']:8.1f} {r['fraction_of_matmul_rate']:9.1%}"
        )
    print(f"({TILES} tiles per micrograph, provider per row; float32 matmul rate: CPU {peak / 1e9:.1f} GFLOP/s"
          + (f", GPU {gpu_peak / 1e9:.1f} GFLOP/s)" if gpu_peak else ")"))


if __name__ == "__main__":
    sys.exit(main())
