"""The masked autoencoder (MAE) of cryo-EMMAE: a small ViT on 64x64 single-channel tiles.

Follows facebookresearch/mae's ``models_mae.py``: patchify, random masking,
encoder over the visible patches, decoder over all patches with mask tokens, MSE
on the masked patches. Differences of the method: one channel, the encoder's
fixed sin-cos positional embedding scaled by ``pos_embed_scale`` (0.08), and a
deterministic :meth:`MaskedAutoencoder.embed` (no shuffling) that is the only graph
the runtime ever sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MAEArchitecture:
    """Every hyperparameter of the model; the defaults are the reference's."""

    tile_px: int = 64
    patch_px: int = 4
    embed_dim: int = 192
    depth: int = 14
    num_heads: int = 1
    decoder_embed_dim: int = 128
    decoder_depth: int = 7
    decoder_num_heads: int = 8
    mlp_ratio: float = 2.0
    mask_ratio: float = 0.5
    pos_embed_scale: float = 0.08

    def __post_init__(self) -> None:
        if self.tile_px % self.patch_px:
            raise ValueError(f"tile_px {self.tile_px} is not a multiple of patch_px {self.patch_px}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embedding widths must be multiples of their head counts")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.tile_px // self.patch_px

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding ``[1 + grid^2, dim]`` (row 0, the cls token, is zero)."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # [D/4]
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.ravel(), omega)  # [L, D/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [L, D/2]

    table = np.concatenate([encode(xs), encode(ys)], axis=1)  # [L, D]  (mae's order: w then h)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table.astype(np.float32))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, H, L, D/H]
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block with exact GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a light decoder, for ``[N, 1, tile, tile]`` tiles."""

    def __init__(self, arch: MAEArchitecture = MAEArchitecture()) -> None:
        super().__init__()
        self.arch = arch
        d, dd, p = arch.embed_dim, arch.decoder_embed_dim, arch.patch_px
        # encoder
        self.patch_embed = nn.Conv2d(1, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(d, arch.grid)[None] * arch.pos_embed_scale, persistent=False)
        self.blocks = nn.ModuleList(Block(d, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, arch.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, arch.decoder_num_heads, arch.mlp_ratio) for _ in range(arch.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, p * p)
        self._init_weights()

    def _init_weights(self) -> None:
        weight = self.patch_embed.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- patches -----------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` -> ``[N, L, p*p]``, patches in row-major order."""
        p, g = self.arch.patch_px, self.arch.grid
        x = imgs.reshape(imgs.shape[0], g, p, g, p)
        return x.permute(0, 1, 3, 2, 4).reshape(imgs.shape[0], g * g, p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, p*p]`` -> ``[N, 1, H, W]``."""
        p, g = self.arch.patch_px, self.arch.grid
        x = x.reshape(x.shape[0], g, g, p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], 1, g * p, g * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of the patches of each tile.

        Returns the kept tokens ``[N, L_keep, D]``, the mask ``[N, L]`` (1 = masked) and
        the indices that restore the original order ``[N, L]``.
        """
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    # --- encoder / decoder -------------------------------------------------------------
    def _tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
        return x + self.pos_embed[:, 1:, :]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1 + L', D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: latent ``[N, 1 + L_keep, D]``, mask ``[N, L]``, ids_restore ``[N, L]``."""
        kept, mask, ids_restore = self.random_masking(self._tokens(imgs), mask_ratio, generator)
        return self._encode(kept), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels ``[N, L, p*p]`` from the visible latents."""
        x = self.decoder_embed(latent)  # [N, 1 + L_keep, Dd]
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:, :], masks], dim=1)  # [N, L, Dd], shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (raw, standardised pixels)."""
        per_patch = ((pred - self.patchify(imgs)) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, predicted patches ``[N, L, p*p]`` and mask ``[N, L]`` for tiles ``[N, 1, H, W]``."""
        ratio = self.arch.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # --- inference ---------------------------------------------------------------------
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Deterministic latents of every patch, ``[N, 1, H, W]`` -> ``[N, L, D]`` (after the final norm, no cls)."""
        return self._encode(self._tokens(imgs))[:, 1:, :]


class Encoder(nn.Module):
    """The part of a trained MAE that the runtime runs: tiles ``[N, 1, H, W]`` -> latents ``[N, L, D]``."""

    def __init__(self, mae: MaskedAutoencoder) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.mae.embed(tiles)
