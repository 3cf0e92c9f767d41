"""Several masked autoencoders trained side by side from a pack, within a wall-clock budget (one GPU call).

The models (:func:`plan_models`): one per left-out dataset (``without-<dataset>``, the
leave-one-dataset-out fold models of ``bench/generalise.py``) and one of every dataset
(``all``, the default's candidate). Each draws its batches from its own micrographs of
the pack (each micrograph equally often): random ``tile_px`` crops anywhere inside a
micrograph's content, each turned by one of the 8 symmetries of the square (flips and
90-degree turns), standardised with the mean and std of the model's own micrographs.

The models take turns, a model ``share`` steps per round (``all`` 2, a fold 1), so a run
cut short leaves every model as far along as the others. The learning rate (linear
warm-up, then cosine, :func:`emmae.trainer.optim.learning_rate`) follows the *progress*:
the share of the time budget spent (or of ``rounds``, if that is reached first), so a
run always ends annealed, whatever the device's speed. bf16 autocast on CUDA, fused
AdamW, gradients clipped. Every ``save_every_s``, and at the end, each model's weights
(fp16, ``<name>.npz``) and the loss log (``log.json``) are written to the output folder
atomically; a model whose loss turns non-finite stops, its last finite weights kept.

Needs torch and NumPy only: no mrcfile, starfile or pydantic on this path.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from emmae.io.atomic import write_bytes_atomic
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder
from emmae.trainer.optim import TrainSettings, learning_rate, make_optimizer, pick_device, validation_loss
from emmae.trainer.pack import Pack, PackError

log = logging.getLogger(__name__)
MICROGRAPH_AREA_PX = 1024**2  # one micrograph-epoch: a 1024^2 grid image's worth of tiles (256 of 64^2)
SCHEDULE_UNITS = 1000  # the learning-rate schedule runs over this many units of progress
LOG_FORMAT = 1
LOG_NAME = "log.json"
META_KEY = "__meta__"


@dataclass(frozen=True)
class ModelPlan:
    """One model: its name, the datasets it trains on, and its steps per round."""

    name: str
    datasets: tuple[str, ...]
    share: int


def plan_models(pack: Pack, names: list[str] | None = None, all_share: int = 2) -> list[ModelPlan]:
    """``without-<d>`` for each dataset ``d`` (when there are several), then ``all``; only ``names`` if given.

    Raises:
        PackError: a name that is not one of these.
    """
    datasets = pack.datasets
    plans = [ModelPlan(f"without-{d}", tuple(x for x in datasets if x != d), 1) for d in datasets] if len(datasets) > 1 else []
    plans.append(ModelPlan("all", tuple(datasets), all_share))
    if names:
        unknown = sorted(set(names) - {p.name for p in plans})
        if unknown:
            raise PackError(f"no model {unknown} for this pack: choose from {[p.name for p in plans]}")
        plans = [p for p in plans if p.name in names]
    return plans


@dataclass(frozen=True)
class MultiSettings:
    """The run's schedule and budget."""

    batch_size: int = 1024
    base_lr: float = 2.5e-4  # at batch 128, scaled linearly (peak 2e-3 at 1024): half the reference's rate per tile
    min_lr: float = 1e-6
    warmup: float = 0.05  # share of the progress spent warming up
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # largest gradient norm (0: no clipping)
    budget_s: float = 450.0  # wall-clock seconds from ``started`` to the last file written
    reserve_s: float = 10.0  # of the budget, kept for the last save
    save_every_s: float = 60.0
    rounds: int = 0  # stop after this many rounds if sooner (0: the budget alone)
    log_every_steps: int = 25
    probe_tiles: int = 512  # fixed tiles of a model's own micrographs, for a loss comparable over the run
    seed: int = 0
    device: str = "auto"

    def schedule(self) -> TrainSettings:
        """The learning-rate schedule over :data:`SCHEDULE_UNITS` units of progress."""
        return TrainSettings(epochs=SCHEDULE_UNITS, batch_size=self.batch_size, base_lr=self.base_lr, min_lr=self.min_lr,
                             warmup_epochs=round(self.warmup * SCHEDULE_UNITS), weight_decay=self.weight_decay, seed=self.seed)


class Crops:
    """Random crops of a pack's images on one device, each turned by a random symmetry of the square."""

    def __init__(self, pack: Pack, tile_px: int, device: torch.device) -> None:
        small = [m.name for m in pack.micrographs if min(m.valid) < tile_px]
        if small:
            raise PackError(f"micrographs smaller than a {tile_px}-px tile: {small}")
        self.images = torch.from_numpy(pack.images).to(device)
        self.valid = torch.tensor([list(m.valid) for m in pack.micrographs], device=device)
        self.tile_px = tile_px
        self._offsets = torch.arange(tile_px, device=device)

    def sample(self, indices: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` crops (uint8 ``[count, t, t]``) of the micrographs ``indices``, each equally likely."""
        device, t, ar = self.images.device, self.tile_px, self._offsets
        which = indices[torch.randint(len(indices), (count,), device=device, generator=generator)]
        room = self.valid[which] - t + 1  # corners that keep the crop inside the content
        corner = (torch.rand(count, 2, device=device, generator=generator) * room).long()
        flip = torch.rand(count, 3, device=device, generator=generator) < 0.5  # rows reversed, columns reversed, transposed
        r = torch.where(flip[:, 0:1], t - 1 - ar, ar)
        c = torch.where(flip[:, 1:2], t - 1 - ar, ar)
        swap = flip[:, 2, None, None]
        rows = corner[:, 0, None, None] + torch.where(swap, r[:, None, :], r[:, :, None])
        cols = corner[:, 1, None, None] + torch.where(swap, c[:, :, None], c[:, None, :])
        return self.images[which[:, None, None], rows, cols]


def content_standardisation(pack: Pack, indices: list[int]) -> dict[str, float]:
    """Mean and std (grey levels / 255) over the content of the micrographs ``indices``."""
    values = np.concatenate([pack.images[i, : pack.micrographs[i].valid[0], : pack.micrographs[i].valid[1]].ravel() for i in indices])
    values = values.astype(np.float64) / 255
    return {"mean": float(values.mean()), "std": float(values.std())}


def probe_tiles(pack: Pack, indices: list[int], tile_px: int, count: int) -> np.ndarray:
    """Up to ``count`` whole tiles inside the content of ``indices``, evenly spread: uint8 ``[n, 1, t, t]``."""
    tiles = []
    for i in indices:
        rows, cols = (n // tile_px for n in pack.micrographs[i].valid)
        image = pack.images[i, : rows * tile_px, : cols * tile_px]
        tiles.append(image.reshape(rows, tile_px, cols, tile_px).transpose(0, 2, 1, 3).reshape(-1, 1, tile_px, tile_px))
    stack = np.concatenate(tiles)
    return stack[np.linspace(0, len(stack) - 1, min(count, len(stack))).round().astype(int)]


@dataclass
class _Run:
    plan: ModelPlan
    model: MaskedAutoencoder
    optimizer: torch.optim.Optimizer
    indices: torch.Tensor
    names: list[str]
    standardisation: dict[str, float]
    probe: torch.Tensor
    loss_sum: torch.Tensor
    loss_count: int = 0
    steps: int = 0
    curve: list[dict] = field(default_factory=list)
    probe_curve: list[dict] = field(default_factory=list)
    diverged: bool = False
    saved: bool = False

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, t, t]`` or ``[n, 1, t, t]`` -> standardised float32 ``[n, 1, t, t]``."""
        x = raw.float().div_(255).sub_(self.standardisation["mean"]).div_(self.standardisation["std"])
        return x if x.ndim == 4 else x.unsqueeze(1)


def micrograph_epochs(tiles: int, tile_px: int) -> float:
    """Tiles of ``tile_px`` seen, in 1024^2 grid images' worth of tile area."""
    return tiles * tile_px**2 / MICROGRAPH_AREA_PX


def train_models(pack: Pack, plans: list[ModelPlan], arch: MAEArchitecture, settings: MultiSettings, out_dir: Path,
                 started: float | None = None) -> dict:
    """Train ``plans`` side by side until the budget (or ``rounds``) is spent; returns the log written to ``out_dir``.

    ``started``: the ``time.perf_counter()`` the budget counts from (default: now).
    Raises PackError (a model without micrographs, a micrograph smaller than a tile).
    """
    started = time.perf_counter() if started is None else started
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crops = Crops(pack, arch.tile_px, device)
    runs = [_make_run(pack, plan, arch, settings, device) for plan in plans]
    record = _log_header(pack, arch, settings, device)
    schedule = settings.schedule()
    t0 = time.perf_counter()
    deadline = started + settings.budget_s - settings.reserve_s
    last_save, rounds, progress = t0, 0, 0.0
    log.info("training %s on %s until %.0f s from the start", ", ".join(p.name for p in plans), record["device"], deadline - started)
    while not all(run.diverged for run in runs):
        progress = max((time.perf_counter() - t0) / max(deadline - t0, 1e-9), rounds / settings.rounds if settings.rounds else 0.0)
        if progress >= 1:
            break
        lr = learning_rate(schedule, SCHEDULE_UNITS * progress)
        for run in runs:
            for _ in range(run.plan.share if not run.diverged else 0):
                _step(run, crops, settings, device, lr, generator)
                if run.steps % settings.log_every_steps == 0:
                    _note(run, settings, arch, lr, time.perf_counter() - t0)
        rounds += 1
        if time.perf_counter() - last_save >= settings.save_every_s:
            _save(runs, record, arch, settings, out_dir, time.perf_counter() - t0, rounds, progress, finished=False)
            last_save = time.perf_counter()
    for run in runs:
        if run.loss_count:
            _note(run, settings, arch, learning_rate(schedule, SCHEDULE_UNITS * min(progress, 1.0)), time.perf_counter() - t0)
    return _save(runs, record, arch, settings, out_dir, time.perf_counter() - t0, rounds, min(progress, 1.0), finished=True)


def _make_run(pack: Pack, plan: ModelPlan, arch: MAEArchitecture, settings: MultiSettings, device: torch.device) -> _Run:
    indices = pack.indices(plan.datasets)
    if not indices:
        raise PackError(f"model {plan.name}: no micrographs of {plan.datasets} in the pack")
    model = MaskedAutoencoder(arch).to(device)
    optimizer = make_optimizer(model, settings.schedule(), fused=device.type == "cuda")
    standardisation = content_standardisation(pack, indices)
    run = _Run(plan=plan, model=model, optimizer=optimizer, indices=torch.tensor(indices, device=device),
               names=[pack.micrographs[i].name for i in indices], standardisation=standardisation,
               probe=torch.empty(0), loss_sum=torch.zeros((), device=device))
    run.probe = run.standardise(torch.from_numpy(probe_tiles(pack, indices, arch.tile_px, settings.probe_tiles)).to(device))
    return run


def _step(run: _Run, crops: Crops, settings: MultiSettings, device: torch.device, lr: float, generator: torch.Generator) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch = run.standardise(crops.sample(run.indices, settings.batch_size, generator))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _, _ = run.model(batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    run.optimizer.step()
    run.loss_sum += loss.detach().float()
    run.loss_count += 1
    run.steps += 1


def _note(run: _Run, settings: MultiSettings, arch: MAEArchitecture, lr: float, seconds: float) -> None:
    """One point of the loss curve: the mean training loss since the last point (a device sync)."""
    loss = float(run.loss_sum) / max(run.loss_count, 1)
    run.loss_sum.zero_()
    run.loss_count = 0
    if not math.isfinite(loss):
        run.diverged = True
        log.error("%s: loss %s after step %d: this model stops (its last finite weights are kept)", run.plan.name, loss, run.steps)
        return
    epochs = micrograph_epochs(_tiles(run, settings), arch.tile_px)
    run.curve.append({"step": run.steps, "seconds": round(seconds, 2), "micrograph_epochs": round(epochs, 1), "lr": lr, "train_loss": loss})


def _tiles(run: _Run, settings: MultiSettings) -> int:
    return run.steps * settings.batch_size


def _save(runs: list[_Run], record: dict, arch: MAEArchitecture, settings: MultiSettings, out_dir: Path,
          seconds: float, rounds: int, progress: float, finished: bool) -> dict:
    for run in runs:
        if not run.diverged and not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
            run.diverged = True  # between two points of the loss curve: the file keeps the last finite weights
            log.error("%s: non-finite weights after step %d: this model stops (its last saved weights are kept)", run.plan.name, run.steps)
        if run.diverged:
            continue
        epochs = micrograph_epochs(_tiles(run, settings), arch.tile_px)
        loss = validation_loss(run.model, run.probe, 256, settings.seed)
        run.probe_curve.append({"step": run.steps, "seconds": round(seconds, 2), "micrograph_epochs": round(epochs, 1), "probe_loss": loss})
        meta = {"format": LOG_FORMAT, "name": run.plan.name, "arch": arch.to_dict(), "standardisation": run.standardisation,
                "steps": run.steps, "micrograph_epochs": epochs, "finished": finished}
        write_bytes_atomic(out_dir / f"{run.plan.name}.npz", _weights_bytes(run.model, meta))
        run.saved = True
    total_tiles = sum(_tiles(run, settings) for run in runs)
    record |= {"elapsed_s": round(seconds, 2), "rounds": rounds, "progress": progress, "finished": finished,
               "tiles_per_s": total_tiles / max(seconds, 1e-9), "models": {run.plan.name: _model_record(run, settings, arch) for run in runs}}
    write_bytes_atomic(out_dir / LOG_NAME, (json.dumps(record, indent=1) + "\n").encode())
    for run in runs:
        log.info("%-24s %6d steps %9.0f micrograph-epochs  loss %s  probe %s%s", run.plan.name, run.steps,
                 micrograph_epochs(_tiles(run, settings), arch.tile_px), _last(run.curve, "train_loss"), _last(run.probe_curve, "probe_loss"),
                 "  DIVERGED" if run.diverged else "")
    return record


def _last(points: list[dict], key: str) -> str:
    return f"{points[-1][key]:.4f}" if points else "-"


def _model_record(run: _Run, settings: MultiSettings, arch: MAEArchitecture) -> dict:
    return {"datasets": list(run.plan.datasets), "micrographs": run.names, "share": run.plan.share, "steps": run.steps,
            "tiles": _tiles(run, settings), "micrograph_epochs": micrograph_epochs(_tiles(run, settings), arch.tile_px),
            "standardisation": run.standardisation, "diverged": run.diverged,
            "weights": f"{run.plan.name}.npz" if run.saved else None, "curve": run.curve, "probe": run.probe_curve}


def _log_header(pack: Pack, arch: MAEArchitecture, settings: MultiSettings, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    counts = {d: len(pack.indices((d,))) for d in pack.datasets}
    return {"format": LOG_FORMAT, "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": asdict(settings), "arch": arch.to_dict(),
            "pack": {"grid_px": pack.grid_px, "micrographs": counts, "preprocess": pack.preprocess,
                     "index": [m.to_dict() for m in pack.micrographs]}}


def _weights_bytes(model: MaskedAutoencoder, meta: dict) -> bytes:
    """The model's parameters as fp16 arrays in an ``.npz``, with ``meta`` (JSON) under ``__meta__``."""
    arrays = {name: value.detach().to("cpu", torch.float16).numpy() for name, value in model.state_dict().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
    return buffer.getvalue()


def read_weights(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The fp16 parameters and the metadata of a ``<name>.npz`` that :func:`train_models` wrote.

    Raises:
        PackError: missing, unreadable or without metadata.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(bytes(archive[META_KEY]).decode())
            return {name: archive[name] for name in archive.files if name != META_KEY}, meta
    except (OSError, ValueError, KeyError) as exc:
        raise PackError(f"{path} is not a weights file of a multi-model run ({exc})") from None
