"""Leave-one-dataset-out models: one per held-out real dataset, trained with the bundled default's recipe.

    python bench/generalise_models.py [--data ../shared/data/real] [--folds all] [--include-all]

Each fold model is trained (``emmae-train``) on the train splits of the *other*
datasets only (their valid splits give the validation loss) and exported
(``emmae-export``, fp32, particle cluster by the label-free prior). The budget is
fixed in micrograph-epochs (``--micrograph-epochs``, default 240: the 30-epoch
default recipe on 8 micrographs), so a fold with more training micrographs runs
fewer epochs and every fold costs the same on a 2-core CPU. Models are cached under
``bench/.cache/generalise/`` by recipe and fold: a rerun only re-picks.
``--include-all`` also trains the model on all datasets' train splits (the
bundled default's candidate).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.generalise_models")
ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "generalise"
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "real"
# The bundled default's architecture (emmae/models/default.onnx provenance).
ARCH = ["--embed-dim", "128", "--depth", "6", "--num-heads", "1", "--decoder-embed-dim", "96", "--decoder-depth", "2", "--decoder-num-heads", "4"]


@dataclass(frozen=True)
class Fold:
    """``held_out``: the dataset the model never sees (None: a model of all datasets)."""

    held_out: str | None
    train_on: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"without-{self.held_out}" if self.held_out else "all"


def datasets(data: Path) -> list[str]:
    return sorted(p.parent.name for p in data.glob("*/manifest.json"))


def folds(data: Path, include_all: bool = False) -> list[Fold]:
    names = datasets(data)
    out = [Fold(held, tuple(n for n in names if n != held)) for held in names]
    return out + ([Fold(None, tuple(names))] if include_all else [])


def train_count(data: Path, fold: Fold) -> int:
    return sum(sum(1 for e in json.loads((data / d / "manifest.json").read_text())["micrographs"].values() if e["split"] == "train") for d in fold.train_on)


def recipe_tag(micrograph_epochs: int, seed: int) -> str:
    return f"default-arch-me{micrograph_epochs}-seed{seed}"


def model_path(fold: Fold, micrograph_epochs: int = 240, seed: int = 0) -> Path:
    return CACHE / recipe_tag(micrograph_epochs, seed) / fold.name / "model.onnx"


def ensure_model(data: Path, fold: Fold, micrograph_epochs: int = 240, seed: int = 0, threads: int | None = None) -> Path:
    """The fold's exported fp32 bundle, trained and exported unless cached."""
    bundle = model_path(fold, micrograph_epochs, seed)
    out = bundle.parent
    if bundle.is_file():
        if not bundle.with_suffix(".mae.npz").is_file() and (out / "checkpoint.pt").is_file():  # exported before bundles carried weights
            export(out, bundle)
        return bundle
    n = train_count(data, fold)
    epochs = max(5, round(micrograph_epochs / n))
    warmup = max(1, round(5 * 8 / n))
    manifests = [arg for d in fold.train_on for arg in ("--manifest", str(data / d / "manifest.json"))]
    python = sys.executable
    train = [python, "-m", "emmae.trainer.cli", *manifests, "--out", str(out), *ARCH, "--epochs", str(epochs),
             "--warmup-epochs", str(warmup), "--seed", str(seed), "--checkpoint-every", "5"]
    if (out / "checkpoint.pt").is_file():
        train += ["--resume", str(out / "checkpoint.pt")]
    if threads:
        train += ["--threads", str(threads)]
    log.info("%s: training on %d micrographs of %s for %d epochs", fold.name, n, ", ".join(fold.train_on), epochs)
    subprocess.run(train, check=True)
    export(out, bundle)
    return bundle


def export(out: Path, bundle: Path, precisions: tuple[str, ...] = ("fp32",)) -> None:
    """Export ``out/checkpoint.pt`` to ``bundle`` (and its weights beside it)."""
    subprocess.run([sys.executable, "-m", "emmae.export.cli", str(out / "checkpoint.pt"), "--out", str(bundle), "--precision", *precisions,
                    "--cluster-method", "prior"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--micrograph-epochs", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--include-all", action="store_true", help="also train on all datasets' train splits")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for fold in folds(args.data, args.include_all):
        log.info("%s -> %s", fold.name, ensure_model(args.data, fold, args.micrograph_epochs, args.seed, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
