"""The MAE training loop: AdamW, linear warm-up then cosine decay, checkpoints, resume.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from emmae.io.atomic import atomic_path
from emmae.trainer.data import Standardisation
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder
from emmae.trainer.optim import TrainSettings, learning_rate, make_optimizer, pick_device, validation_loss

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"  # in the run's folder


@dataclass
class TrainState:
    """What a checkpoint restores."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(
    path: Path, model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, state: TrainState,
    settings: TrainSettings, standardisation: Standardisation, extra: dict,
) -> None:
    """Write a checkpoint atomically (plain dicts and tensors only)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "history": state.history,
        "arch": model.arch.to_dict(),
        "settings": asdict(settings),
        "standardisation": asdict(standardisation),
        "rng": torch.get_rng_state(),
        "extra": extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True``. Raises ``FileNotFoundError``/``RuntimeError``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    arch: MAEArchitecture,
    settings: TrainSettings,
    train_tiles: np.ndarray,
    valid_tiles: np.ndarray | None,
    standardisation: Standardisation,
    out_dir: Path,
    resume: Path | None = None,
    extra: dict | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    initial: dict[str, np.ndarray] | None = None,
) -> tuple[MaskedAutoencoder, TrainState]:
    """Train (or resume) an MAE on standardised tiles; checkpoints go to ``out_dir``.

    ``progress(step, total_steps, info)`` is called after every batch. ``initial``:
    parameters to start from (fine-tuning; ignored when resuming). With
    ``settings.budget_s``, the epochs are cut to what fits the budget once the first
    has been timed, and an epoch that overruns it stops early.
    """
    torch.manual_seed(settings.seed)
    device = pick_device(settings.device)
    model = MaskedAutoencoder(arch)
    if initial is not None and resume is None:
        model.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in initial.items()})
    model = model.to(device)
    optimizer = make_optimizer(model, settings)
    state = TrainState()
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = TrainState(epoch=int(checkpoint["epoch"]), history=list(checkpoint["history"]))
        torch.set_rng_state(checkpoint["rng"])
        log.info("resumed from %s at epoch %d", resume, state.epoch)
    data = torch.from_numpy(standardisation.apply(train_tiles)).to(device)
    valid = None if valid_tiles is None else torch.from_numpy(standardisation.apply(valid_tiles)).to(device)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    deadline = time.perf_counter() + settings.budget_s if settings.budget_s > 0 else math.inf
    first = state.epoch
    while state.epoch < settings.epochs:
        record = _run_epoch(model, optimizer, data, settings, state.epoch, device, progress, total_steps, deadline)
        state.epoch += 1
        if state.epoch == first + 1 and settings.budget_s > 0:
            settings = _fit_budget(settings, state.epoch, record["seconds"], deadline)
            total_steps = steps_per_epoch * settings.epochs
        if record.get("cut"):
            settings = replace(settings, epochs=state.epoch)
        if valid is not None:
            record["valid_loss"] = validation_loss(model, valid, settings.batch_size, settings.seed)
        state.history.append(record)
        log.info("epoch %d/%d %s", state.epoch, settings.epochs, {k: round(v, 5) for k, v in record.items()})
        if state.epoch % settings.checkpoint_every == 0 or state.epoch == settings.epochs:
            save_checkpoint(out_dir / CHECKPOINT_FILE, model, optimizer, state, settings, standardisation, extra)
    return model, state


def _fit_budget(settings: TrainSettings, epochs_done: int, epoch_s: float, deadline: float) -> TrainSettings:
    """The settings with as many epochs as fit before ``deadline`` at ``epoch_s`` each (never more than asked)."""
    more = int(max(deadline - time.perf_counter(), 0.0) / max(epoch_s, 1e-9))
    epochs = min(settings.epochs, epochs_done + more)
    if epochs < settings.epochs:
        log.info("time budget %.0f s: %d epochs of %.0f s fit (instead of %d)", settings.budget_s, epochs, epoch_s, settings.epochs)
    return replace(settings, epochs=epochs)


def _run_epoch(
    model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, data: torch.Tensor, settings: TrainSettings,
    epoch: int, device: torch.device, progress: Callable[[int, int, dict], None] | None, total_steps: int,
    deadline: float = math.inf,
) -> dict:
    model.train()
    generator = torch.Generator().manual_seed(settings.seed * 100003 + epoch)
    order = torch.randperm(len(data), generator=generator).to(device)
    steps = math.ceil(len(data) / settings.batch_size)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        lr = learning_rate(settings, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[order[step * settings.batch_size : (step + 1) * settings.batch_size]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            seconds = time.perf_counter() - start
            tiles_per_s = min((step + 1) * settings.batch_size, len(data)) / max(seconds, 1e-9)
            progress(epoch * steps + step + 1, total_steps, {"loss": losses[-1], "lr": lr, "tiles/s": tiles_per_s})
        if time.perf_counter() > deadline and step + 1 < steps:
            log.info("time budget %.0f s spent after step %d of %d of epoch %d: training stops", settings.budget_s, step + 1, steps, epoch + 1)
            break
    seconds = time.perf_counter() - start
    record = {"train_loss": float(np.mean(losses)), "lr": lr, "seconds": seconds, "tiles_per_s": min(len(losses) * settings.batch_size, len(data)) / seconds}
    return record | ({"cut": 1.0} if len(losses) < steps else {})
