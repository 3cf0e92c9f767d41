"""emmae-train: train the masked autoencoder on micrographs.

Each micrograph is preprocessed once (cached under OUT/cache), cut into tiles and
standardised with the training set's mean and std; the model trains with AdamW (warm-up
then cosine decay) and writes checkpoint.pt and history.json to OUT. Architecture and
schedule default to the reference's. With --init BUNDLE, the training continues from
a bundle's weights instead (fine-tuning): its architecture and preprocessing, a short
schedule at a small learning rate (5 epochs, base lr 1e-4, 1 warm-up epoch unless
given), the new micrographs' own standardisation. Exit status: 0 trained, 2 bad
arguments, data or device.
"""


from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from emmae.commandline import add_common_arguments, setup_logging
from emmae.config import EmmaeConfig, PreprocessConfig, add_config_arguments, config_from_args, resolve_diameter_px
from emmae.errors import BackendError, EmmaeError
from emmae.io.atomic import write_bytes_atomic
from emmae.io.inputs import expand_inputs
from emmae.io.mrc import read_micrograph
from emmae.memory import retain_freed_memory
from emmae.backend import check_threads
from emmae.trainer.data import (
    MicrographItem,
    Standardisation,
    fit_standardisation,
    items_from_manifest,
    load_tiles,
)
from emmae.trainer.finetune import FINETUNE_SETTINGS, open_parent
from emmae.trainer.model import MAEArchitecture
from emmae.trainer.train import CHECKPOINT_FILE, TrainSettings, load_checkpoint, train

log = logging.getLogger("emmae.train")
EXAMPLES = """examples:
  emmae-train Micrographs/ --diameter-A 300 --out runs/mae
  emmae-train --manifest data/EMPIAR-10028/manifest.json --epochs 100 --depth 6 --out runs/small
  emmae-train --resume runs/mae/checkpoint.pt --out runs/mae
  emmae-train --init model.onnx Session/*.mrc --diameter-px 180 --budget-s 600 --out runs/adapted
"""


FIELD_HELP = {
    "tile_px": "tile side in pixels of the working grid",
    "patch_px": "ViT patch side in pixels (one latent per patch)",
    "embed_dim": "encoder width (latent length)",
    "depth": "encoder transformer blocks",
    "num_heads": "encoder attention heads",
    "decoder_embed_dim": "decoder width",
    "decoder_depth": "decoder transformer blocks",
    "decoder_num_heads": "decoder attention heads",
    "mlp_ratio": "MLP hidden width as a multiple of the block width",
    "mask_ratio": "fraction of patches masked during training",
    "pos_embed_scale": "scale of the encoder's fixed sin-cos position embedding",
    "epochs": "passes over the training tiles",
    "batch_size": "tiles per optimisation step",
    "base_lr": "peak learning rate at batch 128 (scaled linearly with the batch size)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_epochs": "epochs of linear warm-up",
    "weight_decay": "AdamW weight decay (not on biases, norms and tokens)",
    "seed": "random seed of the masking and the tile order",
    "checkpoint_every": "write checkpoint.pt every this many epochs (and at the end)",
    "budget_s": "stop training after this many seconds; the epochs are fitted to it after the first (0: no limit)",
}
SKIPPED_FIELDS = {"device"}  # given by the common --device option (auto/cpu/gpu)


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED_FIELDS:
            continue
        explained = FIELD_HELP.get(f.name, f.name.replace("_", " "))
        group.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"{explained} (default {f.default})")


def _given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that the command line gives (the rest: the checkpoint's, the parent's or the default)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in SKIPPED_FIELDS and getattr(args, f.name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-train", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="training micrographs: files, folders (their *.mrc) or globs")
    parser.add_argument("--valid", nargs="*", default=[], help="held-back micrographs for the validation loss")
    parser.add_argument("--manifest", action="append", type=Path, default=[], help="dataset manifest.json: its 'train' split trains, 'valid' validates (repeatable)")
    parser.add_argument("--diameter-px", type=float, help="particle diameter in pixels of the input micrographs")
    parser.add_argument("--diameter-A", type=float, help="particle diameter in Angstrom (needs a pixel size)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (checkpoint, history)")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint")
    parser.add_argument("--init", type=Path, metavar="BUNDLE", help="fine-tune: start from this model bundle's weights (its .mae.npz beside it)")
    parser.add_argument("--cache", type=Path, help="folder for preprocessed images (default OUT/cache)")
    add_common_arguments(parser)
    add_config_arguments(parser)
    _add_dataclass_options(parser, MAEArchitecture, "model architecture")
    _add_dataclass_options(parser, TrainSettings, "optimisation")
    return parser


@dataclass(frozen=True)
class TrainRequest:
    """One training run: what emmae-train's options say (:func:`request_from_args`), or what a caller such as
    emmae-adapt asks for."""

    out: Path  # the folder of checkpoint.pt and history.json
    inputs: tuple[str, ...] = ()  # training micrographs: files, folders or globs
    valid: tuple[str, ...] = ()  # held-back micrographs for the validation loss
    manifests: tuple[Path, ...] = ()  # their 'train' splits train, their 'valid' splits validate
    config: EmmaeConfig = field(default_factory=EmmaeConfig)
    diameter_px: float | None = None  # the micrographs' particle diameter (else the configuration's)
    diameter_A: float | None = None
    resume: Path | None = None  # continue from this checkpoint
    init: Path | None = None  # fine-tune: start from this bundle's weights
    cache: Path | None = None  # preprocessed images (default OUT/cache)
    arch: dict[str, Any] = field(default_factory=dict)  # MAEArchitecture fields given
    settings: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields given (not device)
    device: str | None = None  # auto/cpu/gpu; None: the checkpoint's or the default


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """The run that :func:`build_parser`'s ``args`` ask for. Raises ConfigError (the configuration)."""
    return TrainRequest(out=args.out, inputs=tuple(args.inputs), valid=tuple(args.valid), manifests=tuple(args.manifest),
                        config=config_from_args(args), diameter_px=args.diameter_px, diameter_A=args.diameter_A, resume=args.resume,
                        init=args.init, cache=args.cache, arch=_given(MAEArchitecture, args), settings=_given(TrainSettings, args),
                        device=args.device)


def _items(paths: tuple[str, ...], request: TrainRequest) -> list[MicrographItem]:
    pre = request.config.preprocess
    pre = pre.model_copy(update={"diameter_px": request.diameter_px or pre.diameter_px, "diameter_A": request.diameter_A or pre.diameter_A})
    items = []
    for path in expand_inputs(list(paths)) if paths else []:
        header = read_micrograph(path).pixel_size_A if pre.diameter_px is None else None
        items.append(MicrographItem(path=path, diameter_px=resolve_diameter_px(pre, header)))
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    retain_freed_memory()
    try:
        check_threads(args.threads)
        if args.threads:
            torch.set_num_threads(args.threads)
        run_training(request_from_args(args))
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def torch_device(device: str | None) -> str | None:
    """The torch device for ``--device`` (auto/cpu/gpu; None: keep the checkpoint's or the default).

    Raises:
        BackendError: ``gpu`` asked for and torch sees no usable CUDA GPU.
    """
    if device == "gpu":
        if not torch.cuda.is_available():
            raise BackendError("--device gpu: torch sees no usable CUDA GPU (use --device cpu or auto)")
        return "cuda"
    return device


def run_training(request: TrainRequest, progress: Callable[[int, int, dict], None] | None = None) -> Path:
    """Train as ``request`` says; ``progress(step, total, info)`` replaces the progress bar. Returns the checkpoint written.

    Raises:
        EmmaeError, FileNotFoundError, ValueError: bad data, options or device.
    """
    config = request.config
    checkpoint = load_checkpoint(request.resume) if request.resume else None
    parent = open_parent(request.init) if request.init and not checkpoint else None
    base_arch = checkpoint["arch"] if checkpoint else parent.weights.arch if parent else None
    base_settings = checkpoint["settings"] if checkpoint else FINETUNE_SETTINGS if parent else None
    if parent and request.arch:
        raise ValueError("--init keeps the bundle's architecture: leave out the architecture options")
    arch = MAEArchitecture(**(base_arch or {}) | request.arch)
    device = torch_device(request.device)
    settings = TrainSettings(**(base_settings or {}) | ({"device": device} if device else {}) | request.settings)
    train_items = _items(request.inputs, request) + [i for m in request.manifests for i in items_from_manifest(m, "train")]
    valid_items = _items(request.valid, request) + [i for m in request.manifests for i in items_from_manifest(m, "valid")]
    if not train_items:
        raise ValueError("no training micrographs: give files/folders or --manifest")
    pre = config.preprocess.model_copy(update={"tile_px": arch.tile_px})
    if parent:
        pre = parent.preprocess(config.preprocess)
    elif checkpoint:
        pre = PreprocessConfig(**{**checkpoint["extra"]["preprocess"], "diameter_px": pre.diameter_px, "diameter_A": pre.diameter_A})
    cache = request.cache or request.out / "cache"
    train_tiles = load_tiles(train_items, pre, cache)
    valid_tiles = load_tiles(valid_items, pre, cache) if valid_items else None
    standardisation = fit_standardisation(train_tiles)
    if checkpoint:
        standardisation = Standardisation(**checkpoint["standardisation"])
    extra = {
        "train": [[str(i.path), i.diameter_px] for i in train_items],
        "valid": [[str(i.path), i.diameter_px] for i in valid_items],
        "preprocess": pre.model_dump(mode="json"),
        "parent": parent.provenance() if parent else (checkpoint["extra"].get("parent") if checkpoint else None),
    }
    show_bar = progress is None and sys.stderr.isatty() and logging.getLogger().isEnabledFor(logging.INFO)
    bar = _progress_bar(settings) if show_bar else None
    initial = parent.weights.state if parent else None
    if parent:
        log.info("fine-tuning %s on %d micrographs: %d epochs, base lr %g", parent.path.name, len(train_items), settings.epochs, settings.base_lr)
    with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():  # log lines above the bar, not on it
        model, state = train(arch, settings, train_tiles, valid_tiles, standardisation, request.out, request.resume, extra, bar or progress, initial)
    if bar is not None:
        bar.close()
    write_bytes_atomic(request.out / "history.json", json.dumps(state.history, indent=1).encode())
    last = state.history[-1] if state.history else {}
    log.info("done: %d epochs, train loss %.4f, valid loss %s", state.epoch, last.get("train_loss", float("nan")), last.get("valid_loss"))
    return request.out / CHECKPOINT_FILE


def _progress_bar(settings: TrainSettings):
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", dynamic_ncols=True)

    def update(step: int, total: int, info: dict) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{info['loss']:.4f}", tiles_s=f"{info['tiles/s']:.0f}", refresh=False)
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


if __name__ == "__main__":
    sys.exit(main())
