"""Per-stage picking time (read, preprocess, encode, cluster, post-process, write), CPU and GPU.

    python bench/pick.py [--count 5] [--sizes 1024 4096] [--bundle model.onnx]

Synthetic micrographs (``emmae.synth``) are written as MRC files, read, preprocessed
and encoded one by one, then clustered and post-processed under both rules: the
default (``session``: the session fitted once on the warm-up micrograph, as a stream
does, then template localisation) and the authors' (``reference``: per-micrograph
hierarchy, connected components). The table shows the median of each stage over the
micrographs (after the warm-up one), the encoder's share of the total and each rule's
total over the reference rule's, over the ``previous`` one's (the template picker
before latent vetting) and over ``without classes`` (the picker as shipped less its
session classes, with a session fitted without them), measured in the same run.
Results: ``bench/results/pick-<device>.json``.
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

from emmae.backend import CPU, get_backend
from emmae.config import EmmaeConfig
from emmae.errors import BackendError
from emmae.io.picks import write_relion_coordinates
from emmae.memory import retain_freed_memory
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import encode, fit, pick, prepare
from emmae.synth import SynthParams, write_session

log = logging.getLogger("bench.pick")
RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ["read", "preprocess", "encode", "cluster", "postprocess", "write"]


# session: as shipped; without classes: the same without session classes (its own session, fitted
# without them); previous: the template picker before latent vetting (the cluster's share
# weighting the match by half, no vetting); reference: the authors' rule (kept last: the ratios' base).
RULES = {"session": {}, "without classes": {"postprocess": {"session_classes": 0}}, "previous": {"postprocess": {"latent_gate": 0.5, "latent_vetting": False, "session_classes": 0}},
         "reference": {"cluster": {"selection": "reference"}, "postprocess": {"method": "components"}}}


def bench_size(size: int, count: int, encoder: Encoder, folder: Path) -> list[dict]:
    diameter = 56.0 * size / 1024
    paths = write_session(folder / str(size), count + 1, SynthParams(shape=(size, size), diameter_px=diameter), seed=size)
    configs = {rule: EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}, **extra}) for rule, extra in RULES.items()}
    samples: dict[str, dict[str, list[float]]] = {rule: {stage: [] for stage in [*STAGES, "total"]} for rule in RULES}
    sessions: dict = {}
    for i, path in enumerate(paths):
        encoded = encode(prepare(path, configs["session"], encoder), encoder)
        if i == 0:  # warm-up; the stream's session is fitted on its first micrograph
            sessions = {rule: fit([encoded], configs[rule], encoder) for rule in ("session", "without classes")}
            continue
        for rule, config in configs.items():
            result = pick(encoded, config, encoder, sessions.get(rule, sessions["session"]) if rule != "reference" else None)
            start = time.perf_counter()
            write_relion_coordinates(folder / f"{path.stem}_autopick.star", result.xy, result.score)
            timings = {**result.timings_s, "write": time.perf_counter() - start}
            for stage in STAGES:
                samples[rule][stage].append(timings[stage])
            samples[rule]["total"].append(sum(timings[s] for s in STAGES))
    rows = []
    for rule in RULES:
        medians = {stage: statistics.median(v) for stage, v in samples[rule].items()}
        rows.append({"size": size, "rule": rule, "micrographs": count, "median_s": medians, "encode_share": medians["encode"] / medians["total"],
                     "cluster_plus_postprocess_s": medians["cluster"] + medians["postprocess"]})
    totals = {row["rule"]: row["median_s"]["total"] for row in rows}
    for row in rows:
        row["total_over_reference_rule"] = row["median_s"]["total"] / totals["reference"]
        row["total_over_previous"] = row["median_s"]["total"] / totals["previous"]
        row["total_over_without_classes"] = row["median_s"]["total"] / totals["without classes"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto")
    parser.add_argument("--output", type=Path, help="default: bench/results/pick-<device>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    try:
        backend = get_backend(args.device)
    except BackendError as exc:
        log.error("%s", exc)
        return 2
    encoder = Encoder.open(args.bundle, backend=backend)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            rows.extend(bench_size(size, args.count, encoder, Path(folder)))
    print(f"{'size':>6} {'rule':>15} " + " ".join(f"{s:>11}" for s in [*STAGES, "total"])
          + f" {'encoder share':>13} {'/ reference':>11} {'/ previous':>10} {'/ no classes':>12}")
    for r in rows:
        print(f"{r['size']:>6} {r['rule']:>15} " + " ".join(f"{r['median_s'][s] * 1e3:11.1f}" for s in [*STAGES, "total"])
              + f" {r['encode_share']:13.0%} {r['total_over_reference_rule']:11.2f} {r['total_over_previous']:10.2f} {r['total_over_without_classes']:12.2f}")
    print(f"(milliseconds, medians over {args.count} micrographs; device {backend.device_name}, encoder on {encoder.bundle.providers[0]})")
    out = args.output or RESULTS / f"pick-{'cpu' if backend is CPU else backend.device_name.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": backend.device_name, "provider": encoder.bundle.providers[0]}
    out.write_text(json.dumps({"machine": machine, "bundle": encoder.bundle.path.name, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
