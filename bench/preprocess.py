"""Preprocessing speed: per-step and total seconds of both modes, CPU (and GPU when present).

    python bench/preprocess.py [--repeats 5] [--sizes 1024x1024 4096x4096 5760x4092] [--no-baseline]

Inputs are synthetic micrographs (``emmae.synth``) of the given sizes (nx x ny), with
particle diameters in proportion (224 px at 4096). Each case is warmed up once,
then run ``--repeats`` times; the table shows medians. ``read`` is a memory-mapped
MRC read of the same micrograph from the page cache (the disk read, reported apart).
``baseline`` re-creates the authors' operations at full resolution (complex float64
FFTs for the normalisation and the "Wiener" filter, the full guided filter, CLAHE,
antialiased bicubic resize) to measure their cost on this machine.
The results go to ``bench/results/preprocess-<device>.json``.
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

import cv2
import numpy as np
import scipy

from emmae import __version__
from emmae.backend import CPU, Backend, get_backend
from emmae.config import PreprocessConfig
from emmae.errors import BackendError
from emmae.io.mrc import read_micrograph, write_micrograph
from emmae.memory import retain_freed_memory
from emmae.runtime.kernels.filters import gaussian_kernel, ring_mask
from emmae.runtime.picking.preprocess import plan, run_steps
from emmae.runtime.kernels.resize import resize
from emmae.synth import SynthParams, make_micrograph

log = logging.getLogger("bench.preprocess")
RESULTS = Path(__file__).resolve().parent / "results"


def time_pipeline(image: np.ndarray, mode: str, diameter_px: float, backend: Backend, repeats: int) -> dict:
    """Median seconds per step and in total (host array in, device array out, synchronised)."""
    _, steps = plan(image.shape, PreprocessConfig(mode=mode), diameter_px, backend)  # once per shape
    run_steps(image, steps)  # warm-up: FFT plans, allocator, kernels
    per_step: dict[str, list[float]] = {}
    totals = []
    for _ in range(repeats):
        timings: dict[str, float] = {}
        backend.synchronize()
        start = time.perf_counter()
        run_steps(image, steps, timings, sync=backend.synchronize)
        totals.append(time.perf_counter() - start)
        for name, seconds in timings.items():
            per_step.setdefault(name, []).append(seconds)
    return {"total_s": statistics.median(totals), "steps_s": {k: statistics.median(v) for k, v in per_step.items()}}


def time_read(image: np.ndarray, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.mrc"
        write_micrograph(path, image, 1.0)
        read_micrograph(path)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            read_micrograph(path)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def authors_style_baseline(image: np.ndarray, diameter_px: float, out_shape: tuple[int, int]) -> np.ndarray:
    """The reference's operations at full resolution, with its numerical choices (for timing only)."""
    x = image.astype(np.float64)
    x = (x - x.min()) / (x.max() - x.min())
    mask = np.zeros_like(x)
    ring = ring_mask(diameter_px)
    top, left = (np.array(x.shape) - ring.shape[0]) // 2
    mask[top : top + ring.shape[0], left : left + ring.shape[1]] = ring
    f_mask = np.conj(np.fft.fft2(mask))
    mean = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.fft2(x) * f_mask))) / ring.sum()
    mean_sq = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.fft2(x**2) * f_mask))) / ring.sum()
    x = (x - mean) / np.sqrt(np.maximum(mean_sq - mean**2, 1e-12))
    x = (x - x.min()) / (x.max() - x.min())
    kernel = np.zeros_like(x)
    kernel[:9, :9] = np.outer(gaussian_kernel(3.0, 4), gaussian_kernel(3.0, 4))
    f_kernel = np.fft.fft2(kernel)
    wiener = np.abs(np.fft.ifft2(np.fft.fft2(x) * np.conj(f_kernel) / (np.abs(f_kernel) ** 2 + 30)))
    u8 = ((wiener - wiener.min()) / (wiener.max() - wiener.min()) * 255).astype(np.uint8)
    equalised = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(16, 16)).apply(u8).astype(np.float32) / 255
    guide = (wiener / 255).astype(np.float32)
    box = lambda a: cv2.boxFilter(a, -1, (20, 20))  # noqa: E731
    mean_g, mean_i = box(guide), box(equalised)
    a = (box(guide * equalised) - mean_g * mean_i) / (box(guide * guide) - mean_g * mean_g + 0.1)
    b = mean_i - a * mean_g
    guided = box(a) * guide + box(b)
    return resize(guided.astype(np.float32), out_shape, "cubic")


def time_baseline(image: np.ndarray, diameter_px: float, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        authors_style_baseline(image, diameter_px, (1024, 1024))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def backends() -> list[Backend]:
    found = [CPU]
    try:
        gpu = get_backend("gpu")
    except BackendError as exc:
        log.info("no GPU figures: %s", exc)
    else:
        found.append(gpu)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "4096x4096", "5760x4092"], help="nx x ny")
    parser.add_argument("--no-baseline", action="store_true", help="skip the authors-style baseline (slow)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()

    rows = []
    for size in args.sizes:
        nx, ny = (int(v) for v in size.lower().split("x"))
        diameter_px = 224.0 * max(nx, ny) / 4096
        image = make_micrograph(SynthParams(shape=(ny, nx), diameter_px=diameter_px), seed=0).image
        read_s = time_read(image, args.repeats)
        for backend in backends():
            for mode in ("fast", "reference"):
                result = time_pipeline(image, mode, diameter_px, backend, args.repeats)
                rows.append({"size": size, "device": backend.device_name, "mode": mode, "read_s": read_s, **result})
                log.info("%-10s %-6s %-9s total %.4f s", size, backend.name, mode, result["total_s"])
        if not args.no_baseline and size == "4096x4096":
            baseline = time_baseline(image, diameter_px, max(1, min(args.repeats, 3)))
            rows.append({"size": size, "device": "cpu", "mode": "authors-style baseline", "read_s": read_s, "total_s": baseline, "steps_s": {}})

    print_table(rows)
    device = rows[-1]["device"] if any(r["device"] != "cpu" for r in rows) else "cpu"
    out = args.output or RESULTS / f"preprocess-{_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "repeats": args.repeats, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


def print_table(rows: list[dict]) -> None:
    steps = ["upload", "bin", "normalise", "gaussian", "clahe", "box", "resize", "pad"]
    header = f"{'size':<10} {'device':<12} {'mode':<22} {'read':>7} " + " ".join(f"{s:>9}" for s in steps) + f" {'total':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r['steps_s'][s] * 1e3:9.1f}" if s in r["steps_s"] else f"{'-':>9}" for s in steps)
        print(f"{r['size']:<10} {r['device'][:12]:<12} {r['mode']:<22} {r['read_s'] * 1e3:7.1f} {cells} {r['total_s'] * 1e3:8.1f}")
    print("(milliseconds, medians; total excludes the read)")


def machine_info() -> dict:
    return {
        "emmae": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "opencv": cv2.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
