"""emmae-adapt: fine-tune a model on your own micrographs, no labels needed, in one command.

Continues the masked-autoencoder training of a bundle (the bundled default unless
--model) on the given micrographs for a few epochs at a small learning rate
(emmae-train --init), within a time budget, then exports the adapted bundle (fp32
unless --precision), its weights beside it, and a provenance that names the parent
and the micrographs it saw. Work files (preprocessing cache, checkpoint) go to
--work; a run stopped midway resumes from its last epoch when started again with the
same micrographs. Needs the `train` extra (torch, onnx). Exit status: 0 adapted, 2
bad arguments, data or missing extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from emmae.commandline import add_common_arguments, setup_logging
from emmae.config import load_config
from emmae.errors import EmmaeError
from emmae.io.atomic import write_bytes_atomic
from emmae.io.inputs import expand_inputs
from emmae.runtime.picking.bundle import default_bundle_path

# Beside the trainer and the exporter, above both: it trains, then exports (the trainer never imports the exporter).

if TYPE_CHECKING:
    from emmae.trainer.cli import TrainRequest

log = logging.getLogger("emmae.adapt")
EXAMPLES = """examples:
  emmae-adapt Session/Micrographs/*.mrc --diameter-A 120 --out adapted.onnx
  emmae-adapt Session/Micrographs/ --diameter-px 180 --budget-s 300 --model my.onnx --out adapted.onnx
  emmae-pick Session/Micrographs/ --model adapted.onnx --diameter-A 120 --out picks/
"""
MISSING_EXTRA = ("emmae-adapt needs the training extra (torch and onnx), which is not installed: "
                 "on a CPU-only machine `pip install torch==2.13.0` first (a CPU build), then `pip install 'cryo-emmae[train]'` ({})")
DEFAULT_BUDGET_S = 600.0
PROGRESS_INTERVAL_S = 1.0
PARENT_CHECK_S = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-adapt", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="MICROGRAPH", help="micrographs to adapt to: files, folders (their *.mrc) or globs")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the adapted bundle (.onnx); other precisions get a -fp16/-int8 suffix")
    parser.add_argument("--model", type=Path, help="bundle to start from (default: the bundled model)")
    parser.add_argument("--diameter-px", type=float, help="particle diameter in pixels of the micrographs")
    parser.add_argument("--diameter-A", type=float, help="particle diameter in Angstrom (pixel size from each header, or --pixel-size-A)")
    parser.add_argument("--pixel-size-A", type=float, help="pixel size, when the headers lack it")
    parser.add_argument("--epochs", type=int, default=5, help="most epochs (default 5; fewer when the budget is short)")
    parser.add_argument("--base-lr", type=float, default=1e-4, help="peak learning rate at batch 128 (default 1e-4)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"training time budget in seconds; preprocessing and export come on top (default {DEFAULT_BUDGET_S:g}; 0: no limit)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=["fp32"], help="bundles to write (default fp32)")
    parser.add_argument("--work", type=Path, help="folder for the cache and the checkpoint (default: OUT without suffix + '.work')")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the masking and the tile order")
    parser.add_argument("--progress-file", type=Path, help=argparse.SUPPRESS)  # JSON progress, for emmae-stream --adapt
    parser.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)  # the daemon's pid: stop when it dies
    add_common_arguments(parser)
    return parser


class ProgressFile:
    """The adaptation's progress as JSON, rewritten atomically at most once a second (or never, without a path)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self._last = path, -float("inf")

    def write(self, stage: str, step: int = 0, total: int = 0, force: bool = False, **extra: object) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._last < PROGRESS_INTERVAL_S):
            return
        self._last = now
        record = {"stage": stage, "step": step, "total": total, "pid": os.getpid(), "time": time.time(), **extra}
        write_bytes_atomic(self.path, json.dumps(record).encode())


def exit_with_parent(pid: int) -> None:
    """Stop this process (status 3) as soon as process ``pid``, its parent, is gone: a killed daemon leaves no adaptation behind."""

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(3)

    threading.Thread(target=watch, name="emmae-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)
    try:
        from emmae.export.cli import ExportRequest, export_bundles  # needs torch (the train extra)
        from emmae.trainer.cli import run_training
    except ImportError as exc:
        log.error(MISSING_EXTRA.format(exc))
        return 2
    progress = ProgressFile(args.progress_file)
    work = args.work or args.out.with_suffix(".work")
    try:
        progress.write("preprocess", force=True)
        checkpoint = run_training(_train_request(args, work), _reporter(progress))
        progress.write("export", force=True)
        for path in export_bundles(ExportRequest(checkpoint, args.out, tuple(args.precision))):
            log.info("wrote %s", path)
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    progress.write("done", force=True, bundle=str(args.out))
    log.info("adapted model: %s (use it with --model)", args.out)
    return 0


def _train_request(args: argparse.Namespace, work: Path) -> TrainRequest:
    """The training run: resume the work folder's checkpoint if it adapts the same micrographs, else start from the bundle."""
    from emmae.trainer.cli import TrainRequest  # needs torch (the train extra)
    from emmae.trainer.train import CHECKPOINT_FILE

    overrides = [f"preprocess.pixel_size_A={args.pixel_size_A}"] if args.pixel_size_A is not None else []
    settings = {"epochs": args.epochs, "base_lr": args.base_lr, "budget_s": args.budget_s, "seed": args.seed}
    request = TrainRequest(out=work, inputs=tuple(args.inputs), config=load_config(overrides=overrides), diameter_px=args.diameter_px,
                           diameter_A=args.diameter_A, settings=settings, device=args.device)
    checkpoint = work / CHECKPOINT_FILE
    if checkpoint.is_file() and _same_run(checkpoint, args):
        log.info("resuming the adaptation in %s", work)
        return replace(request, resume=checkpoint)
    return replace(request, init=args.model or default_bundle_path())


def _same_run(checkpoint: Path, args: argparse.Namespace) -> bool:
    """The checkpoint fine-tunes the same parent on the same micrographs."""
    from emmae.trainer.train import load_checkpoint  # needs torch (the train extra)

    try:
        extra = load_checkpoint(checkpoint)["extra"]
    except (OSError, RuntimeError, KeyError) as exc:
        log.warning("ignoring the unreadable checkpoint %s (%s)", checkpoint, exc)
        return False
    paths = [str(p) for p in expand_inputs(args.inputs)]
    parent = extra.get("parent") or {}
    wanted = (args.model or default_bundle_path()).name
    return [p for p, _ in extra.get("train", [])] == paths and parent.get("bundle") == wanted


def _reporter(progress: ProgressFile):
    """emmae-train's progress callback: a bar on a terminal, and the progress file."""
    bar = None
    if sys.stderr.isatty() and logging.getLogger().isEnabledFor(logging.INFO):
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", dynamic_ncols=True, desc="adapting")

    def report(step: int, total: int, info: dict) -> None:
        progress.write("train", step, total, loss=round(float(info["loss"]), 5))
        if bar is not None:
            bar.total, bar.n = total, step
            bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
            bar.refresh()

    return report


if __name__ == "__main__":
    sys.exit(main())
