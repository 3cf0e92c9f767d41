"""The optimisation pieces every training loop shares, with torch alone (no file formats, no pydantic).

Settings and schedule, AdamW's parameter groups, the device, and the masked-patch
loss at a fixed masking seed. :mod:`emmae.trainer.train` (``emmae-train``) and
:mod:`emmae.trainer.multi` (several models on a GPU, from a pack) both use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from emmae.trainer.model import MaskedAutoencoder


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation schedule; the defaults are the reference's."""

    epochs: int = 400
    batch_size: int = 128
    base_lr: float = 5e-4  # at batch 128; scaled linearly with the batch size
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 1e-5
    seed: int = 0
    checkpoint_every: int = 10
    budget_s: float = 0.0  # stop training after this many seconds (0: no limit); the epochs are fitted to it after the first
    device: str = "auto"  # "cpu", "cuda" or "auto"


def learning_rate(settings: TrainSettings, epoch_float: float) -> float:
    """Linear warm-up for ``warmup_epochs``, then half-cosine from the peak to ``min_lr``."""
    peak = settings.base_lr * settings.batch_size / 128
    if epoch_float < settings.warmup_epochs:
        return peak * epoch_float / settings.warmup_epochs
    span = max(settings.epochs - settings.warmup_epochs, 1e-9)
    progress = min((epoch_float - settings.warmup_epochs) / span, 1.0)
    return settings.min_lr + (peak - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) with no weight decay on biases, norms and tokens (1-D or fewer dims).

    ``fused``: torch's fused CUDA kernel (None: torch's default).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1 and p.shape[:2] != (1, 1)]
    keep = [p for p in model.parameters() if p.requires_grad and not (p.ndim > 1 and p.shape[:2] != (1, 1))]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.base_lr, betas=(0.9, 0.999), fused=fused)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def validation_loss(model: MaskedAutoencoder, tiles: torch.Tensor, batch_size: int, seed: int) -> float:
    """Masked-patch MSE over ``tiles`` with a fixed masking seed (comparable across epochs)."""
    model.eval()
    generator = torch.Generator(device=tiles.device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        loss, _, _ = model(batch, generator=generator)
        total += float(loss) * len(batch)
        count += len(batch)
    model.train()
    return total / max(count, 1)
