"""Train the default model and the leave-one-dataset-out fold models in one GPU call, from a packed data folder.

    python bench/gpu_train.py pack  [--data ../shared/data/real] [--out .gpu-pack]    # here: build the pack
    python bench/gpu_train.py train [--pack .gpu-pack] --out DIR [--budget-s 450]     # there: train (torch + NumPy)
    python bench/gpu_train_import.py DIR                                              # here again: bundles

``pack`` preprocesses the *train* split of every dataset under ``--data`` (the project's
own preprocessing, as emmae-train reads it) onto the 1024 grid, rounds it to uint8 and
writes ``.gpu-pack/`` (git-ignored; it travels with ``carry``). ``train`` needs only
torch and NumPy: it trains ``without-<dataset>`` for each dataset and ``all`` (the
default's candidate, twice the steps) side by side with the bundled default's
architecture (``emmae.trainer.multi``) until ``--budget-s`` seconds after it started,
writing ``<model>.npz`` (fp16 weights) and ``log.json`` (loss curves) to ``--out`` every
``--save-every-s``. See docs/gpu-training.md for the device call.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here, before torch is imported

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emmae.errors import EmmaeError  # noqa: E402
from emmae.trainer.pack import read_pack, write_pack  # noqa: E402

log = logging.getLogger("bench.gpu_train")
DEFAULT_PACK = ROOT / ".gpu-pack"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"
# The bundled default's architecture (emmae/models/default.onnx provenance); bench/generalise_models.py trains the same.
BUNDLED_ARCH = {"tile_px": 64, "patch_px": 4, "embed_dim": 128, "depth": 6, "num_heads": 1, "decoder_embed_dim": 96,
                "decoder_depth": 2, "decoder_num_heads": 4, "mlp_ratio": 2.0, "mask_ratio": 0.5, "pos_embed_scale": 0.08}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="build the pack from the datasets' train splits (here)")
    pack.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <dataset>/manifest.json")
    pack.add_argument("--out", type=Path, default=DEFAULT_PACK)
    pack.add_argument("--cache", type=Path, help="preprocessing cache (default: none)")
    pack.add_argument("--grid-px", type=int, default=1024)
    pack.add_argument("--limit", type=int, help="at most this many micrographs per dataset (tests)")
    train = commands.add_parser("train", help="train the models from a pack (on the GPU machine)")
    train.add_argument("--pack", type=Path, default=DEFAULT_PACK)
    train.add_argument("--out", type=Path, required=True, help="folder for <model>.npz and log.json (e.g. $OUT)")
    train.add_argument("--budget-s", type=float, default=450.0, help="wall-clock seconds from the start to the last file (default 450)")
    train.add_argument("--save-every-s", type=float, default=60.0)
    train.add_argument("--rounds", type=int, default=0, help="also stop after this many rounds (0: the budget alone)")
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--base-lr", type=float, default=2.5e-4, help="at batch 128, scaled linearly with the batch size")
    train.add_argument("--models", nargs="+", help="only these (default: without-<dataset> for each, and all)")
    train.add_argument("--device", default="auto", help="auto, cuda or cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--arch", help="architecture as JSON fields over the bundled default's (tests: a tiny model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return run_pack(args) if args.command == "pack" else run_train(args)
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


def run_pack(args: argparse.Namespace) -> int:
    from emmae.config import PreprocessConfig  # here only: pydantic and mrcfile are not on the GPU machine
    from emmae.trainer.packer import build_pack

    pack = build_pack(args.data, PreprocessConfig(grid_px=args.grid_px), args.cache, args.limit)
    size = write_pack(args.out, pack)
    print(f"{'dataset':<16} {'train micrographs':>18}")
    for dataset in pack.datasets:
        print(f"{dataset:<16} {len(pack.indices((dataset,))):>18}")
    print(f"{args.out}: {len(pack.micrographs)} micrographs, uint8 {list(pack.images.shape)}, {size / 2**20:.1f} MiB")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import json

    from emmae.trainer.model import MAEArchitecture
    from emmae.trainer.multi import MultiSettings, micrograph_epochs, plan_models, train_models

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: torch %s sees no CUDA GPU", torch.__version__)
        return 2
    if args.device != "cpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside the bf16 autocast
    pack = read_pack(args.pack)
    arch = MAEArchitecture(**(BUNDLED_ARCH | (json.loads(args.arch) if args.arch else {})))
    settings = MultiSettings(batch_size=args.batch_size, base_lr=args.base_lr, budget_s=args.budget_s, save_every_s=args.save_every_s,
                             rounds=args.rounds, seed=args.seed, device=args.device)
    record = train_models(pack, plan_models(pack, args.models), arch, settings, args.out, started=STARTED)
    print(f"{'model':<24} {'micrographs':>11} {'steps':>7} {'micrograph-epochs':>18} {'train loss':>10} {'probe loss':>10}")
    for name, model in record["models"].items():
        last = model["curve"][-1]["train_loss"] if model["curve"] else float("nan")
        probe = model["probe"][-1]["probe_loss"] if model["probe"] else float("nan")
        print(f"{name:<24} {len(model['micrographs']):>11} {model['steps']:>7} {micrograph_epochs(model['tiles'], arch.tile_px):>18.0f} "
              f"{last:>10.4f} {probe:>10.4f}{'  diverged' if model['diverged'] else ''}")
    print(f"{record['device']}: {record['elapsed_s']:.0f} s of training, {record['tiles_per_s']:.0f} tiles/s over all models, "
          f"{time.perf_counter() - STARTED:.0f} s since the start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
