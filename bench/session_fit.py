"""What fitting a session costs: one thread against all of them, in one run, on the same micrographs.

    python bench/session_fit.py [--samples 8] [--repeats 3] [--data ../shared/data/real]

A session (clusters, particle choice, template, figure of merit, latent population) is
fitted on ``--samples`` micrographs, as a batch or a stream's fixed session does: 1024^2
synthetic ones, and EMPIAR-10146's train+valid micrographs (1240 x 1200) where the real
data is present. Each is encoded once; the fit alone is timed (median of ``--repeats``)
with the CPU threads limited to 1 (``-j 1``) and left at the default (every core). The
sessions must be equal (template profile, calibration, digest). At every core, the
same fit without session classes (``postprocess.session_classes=0``, the fit before
them) is timed beside it. Results: ``bench/results/session-fit-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from emmae.backend import cpu_threads
from emmae.config import EmmaeConfig
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import encode, fit, prepare
from emmae.synth import SynthParams, make_micrograph

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULT_DATA, split_items  # noqa: E402

log = logging.getLogger("bench.session_fit")
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(count: int, encoder: Encoder) -> tuple[str, list, EmmaeConfig]:
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": 56.0}})
    params = SynthParams(shape=(1024, 1024), diameter_px=56.0)
    return "synthetic 1024^2", [encode(prepare(make_micrograph(params, seed=i).image, config, encoder), encoder) for i in range(count)], config


def real(data: Path, count: int, encoder: Encoder) -> tuple[str, list, EmmaeConfig] | None:
    folder = data / "EMPIAR-10146"
    if not folder.is_dir():
        return None
    items = [item for split in ("train", "valid") for item in split_items(folder, split)][:count]
    return f"EMPIAR-10146 ({len(items)} micrographs)", [encode(prepare(path, config, encoder), encoder) for path, _, config in items], items[0][2]


def timed(encoded: list, config: EmmaeConfig, encoder: Encoder, threads: int, repeats: int) -> tuple[float, object]:
    cv2.setNumThreads(threads)
    seconds, session = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        session = fit(encoded, config, encoder)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="micrographs in the session (default 8, the stream's session_micrographs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    encoder = Encoder.open()
    every = cpu_threads()
    rows = []
    for found in (synthetic(args.samples, encoder), real(args.data, args.samples, encoder)):
        if found is None:
            continue
        name, encoded, config = found
        one_s, one = timed(encoded, config, encoder, 1, args.repeats)
        all_s, many = timed(encoded, config, encoder, every, args.repeats)
        without_s, _ = timed(encoded, config.model_copy(update={"postprocess": config.postprocess.model_copy(update={"session_classes": 0})}),
                             encoder, every, args.repeats)
        equal = bool(np.array_equal(one.profile, many.profile) and one.digest() == many.digest())
        if not equal:
            log.error("%s: the session differs between 1 and %d threads", name, every)
        rows.append({"micrographs": name, "samples": len(encoded), "threads": every, "fit_1_thread_s": round(one_s, 3),
                     "fit_all_threads_s": round(all_s, 3), "speed_up": round(one_s / all_s, 2), "sessions_equal": equal,
                     "fit_without_classes_s": round(without_s, 3), "classes_cost": round(all_s / without_s, 3)})
    print(f"{'session of':<30} {'1 thread s':>10} {f'{every} threads s':>12} {'speed-up':>8} {'equal':>6} {'no classes s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['micrographs']:<30} {r['fit_1_thread_s']:10.2f} {r['fit_all_threads_s']:12.2f} {r['speed_up']:8.2f} {str(r['sessions_equal']):>6} "
              f"{r['fit_without_classes_s']:12.2f} {r['classes_cost']:6.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "session-fit-cpu.json").write_text(json.dumps({"cores": os.cpu_count(), "repeats": args.repeats, "results": rows}, indent=1) + "\n")
    return 0 if all(r["sessions_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
