"""Bundles from a GPU training run (``bench/gpu_train.py train``): ONNX fp32 / fp16 / int8 of every model.

    python bench/gpu_train_import.py FOLDER [--data ../shared/data/real] [--out bench/.cache/generalise/gpu]

FOLDER holds what the run wrote: ``<model>.npz`` (fp16 weights) and ``log.json``. For each
model, here on the CPU: the weights (in fp32) and the run's record become an emmae-train
checkpoint (``OUT/<model>/checkpoint.pt``: its training micrographs found under ``--data``,
the masked loss on the *valid* splits of its datasets as the validation loss), which
emmae-export turns into ``OUT/<model>/model.onnx`` (+ ``-fp16``, ``-int8`` and the
fine-tuning weights ``.mae.npz``), the particle cluster named by the label-free prior.
Each bundle's provenance records the training device, the micrograph-epochs, the steps,
the run's settings and its loss curves (``loss_curve``: training loss by step;
``probe_loss_curve``: a fixed-tile loss at every save).

The fold models (``without-<dataset>``) then sit where ``bench/generalise.py --models OUT``
reads them; ``OUT/all/model.onnx`` is the default's candidate (``--default``). Prints one
row per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emmae.config import PreprocessConfig  # noqa: E402
from emmae.errors import EmmaeError  # noqa: E402
from emmae.export.cli import ExportRequest, export_bundles  # noqa: E402
from emmae.trainer.data import Standardisation, items_from_manifest, load_tiles  # noqa: E402
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder  # noqa: E402
from emmae.trainer.multi import LOG_NAME, read_weights  # noqa: E402
from emmae.trainer.optim import TrainSettings, validation_loss  # noqa: E402

log = logging.getLogger("bench.gpu_train_import")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"
DEFAULT_OUT = ROOT / "bench" / ".cache" / "generalise" / "gpu"


def checkpoint_of(name: str, run: dict, folder: Path, data: Path, cache: Path | None) -> dict:
    """An emmae-train checkpoint (plain dict) of model ``name`` of the run ``run`` (its ``log.json``).

    Raises:
        FileNotFoundError: the weights or a training micrograph is missing; PackError: unreadable weights.
    """
    entry = run["models"][name]
    if not entry.get("weights"):
        raise FileNotFoundError(f"{name}: the run saved no weights (diverged before its first save?)")
    state, meta = read_weights(folder / entry["weights"])
    arch = MAEArchitecture(**meta["arch"])
    mae = MaskedAutoencoder(arch)
    mae.load_state_dict({key: torch.from_numpy(value.astype(np.float32)) for key, value in state.items()})  # strict: every name, every shape
    index = {m["name"]: m for m in run["pack"]["index"]}
    train = [[str(data / index[n]["source"]), float(index[n]["diameter_px"])] for n in entry["micrographs"]]
    missing = [path for path, _ in train if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: training micrographs not under {data}: {missing[:3]}")
    pre = PreprocessConfig(**run["pack"]["preprocess"])
    valid_items = [item for d in entry["datasets"] for item in items_from_manifest(data / d / "manifest.json", "valid")]
    history = [{"train_loss": p["train_loss"], "lr": p["lr"]} for p in entry["curve"]] or [{}]
    if valid_items:
        tiles = Standardisation(**meta["standardisation"]).apply(load_tiles(valid_items, pre, cache))
        history[-1]["valid_loss"] = validation_loss(mae, torch.from_numpy(tiles), 256, 0)
    epochs = round(meta["micrograph_epochs"] / len(train))  # passes over its micrographs' worth of tiles
    settings = run["settings"]
    provenance = {
        "trained_by": "bench/gpu_train.py (emmae.trainer.multi)", "device": run["device"], "train_torch": run["torch"],
        "cuda": run["cuda"], "micrograph_epochs": meta["micrograph_epochs"], "steps": meta["steps"], "tiles": entry["tiles"],
        "datasets": entry["datasets"], "finished": meta["finished"],
        "run": {key: run[key] for key in ("started_utc", "elapsed_s", "rounds", "progress", "finished", "tiles_per_s")} | {"settings": settings},
        "loss_curve": entry["curve"], "probe_loss_curve": entry["probe"],
    }
    return {
        "model": mae.state_dict(), "optimizer": {}, "epoch": epochs, "history": history, "arch": arch.to_dict(),
        "settings": asdict(TrainSettings(epochs=epochs, batch_size=settings["batch_size"], base_lr=settings["base_lr"], min_lr=settings["min_lr"],
                                         weight_decay=settings["weight_decay"], seed=settings["seed"], device=settings["device"])),
        "standardisation": dict(meta["standardisation"]), "rng": torch.get_rng_state(),
        "extra": {"train": train, "valid": [[str(i.path), i.diameter_px] for i in valid_items], "preprocess": pre.model_dump(mode="json"),
                  "parent": None, "provenance": provenance},
    }


def import_run(folder: Path, data: Path, out: Path, precisions: list[str], models: list[str] | None = None) -> list[dict]:
    """Checkpoints and bundles of the run in ``folder`` under ``out/<model>/``; one summary row per model."""
    run = json.loads((folder / LOG_NAME).read_text())
    cache = out / "cache"  # the preprocessed training micrographs, shared by the models' exports
    rows = []
    for name in models or list(run["models"]):
        checkpoint = checkpoint_of(name, run, folder, data, cache)
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, target / "checkpoint.pt")
        written = export_bundles(ExportRequest(target / "checkpoint.pt", target / "model.onnx", tuple(precisions), cluster_method="prior", cache=cache))
        last = checkpoint["history"][-1]
        rows.append({"model": name, "device": run["device"], "micrograph_epochs": checkpoint["extra"]["provenance"]["micrograph_epochs"],
                     "steps": checkpoint["extra"]["provenance"]["steps"], "train_loss": last.get("train_loss"), "valid_loss": last.get("valid_loss"),
                     "files": [str(p) for p in written]})
    (out / LOG_NAME).write_text(json.dumps(run, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="what bench/gpu_train.py train wrote (<model>.npz, log.json)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the datasets the pack was built from")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bundles go to OUT/<model>/ (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=["fp32", "fp16", "int8"])
    parser.add_argument("--models", nargs="+", help="only these models of the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        rows = import_run(args.folder, args.data, args.out, args.precision, args.models)
    except (EmmaeError, FileNotFoundError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(f"{'model':<24} {'device':<24} {'micrograph-epochs':>18} {'steps':>7} {'train loss':>10} {'valid loss':>10}  bundle")
    for r in rows:
        valid = f"{r['valid_loss']:10.4f}" if r["valid_loss"] is not None else f"{'-':>10}"
        print(f"{r['model']:<24} {r['device']:<24} {r['micrograph_epochs']:18.0f} {r['steps']:7d} {r['train_loss'] or float('nan'):10.4f} {valid}  {r['files'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
