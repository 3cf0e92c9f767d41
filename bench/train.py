"""Training throughput (tiles/s) of the MAE: forward, backward and AdamW step, median of steps.

    python bench/train.py [--batch-size 128] [--steps 5]

Times the bundled default architecture and the reference architecture on the CPU
(and on CUDA when torch sees a GPU). Results: ``bench/results/train-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from emmae.runtime.picking.bundle import default_bundle_path, encoder_flops, open_bundle
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder
from emmae.trainer.train import TrainSettings, make_optimizer

log = logging.getLogger("bench.train")
RESULTS = Path(__file__).resolve().parent / "results"


def tiles_per_second(arch: MAEArchitecture, device: torch.device, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = MaskedAutoencoder(arch).to(device)
    optimizer = make_optimizer(model, TrainSettings())
    batch = torch.randn(batch_size, 1, arch.tile_px, arch.tile_px, device=device)
    samples = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            samples.append(time.perf_counter() - start)
    return batch_size / statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    archs = {"reference": MAEArchitecture()}
    if default_bundle_path().is_file():
        archs["bundled default"] = MAEArchitecture(**open_bundle().info.arch)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name, arch in archs.items():
            rate = tiles_per_second(arch, device, args.batch_size, args.steps)
            rows.append({"model": name, "device": str(device), "embed_dim": arch.embed_dim, "depth": arch.depth,
                         "decoder_depth": arch.decoder_depth, "encoder_gflop_per_tile": encoder_flops(arch.to_dict()) / 1e9,
                         "tiles_per_s": rate, "seconds_per_epoch_2048_tiles": 2048 / rate})
            log.info("%-16s %-5s %6.1f tiles/s", name, device, rate)
    print(f"{'model':<16} {'device':<6} {'D x depth (dec)':>16} {'tiles/s':>8} {'s / 2048-tile epoch':>20}")
    for r in rows:
        print(f"{r['model']:<16} {r['device']:<6} {r['embed_dim']:>6} x {r['depth']:<2} ({r['decoder_depth']}) {r['tiles_per_s']:8.1f} {r['seconds_per_epoch_2048_tiles']:20.1f}")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"train-{device_name.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"machine": machine, "batch_size": args.batch_size, "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
