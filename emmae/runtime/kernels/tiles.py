"""Tile <-> latent-map geometry, for NumPy and CuPy arrays.

A grid image ``[H, W]`` (whole tiles) is cut into ``T = (H / t) * (W / t)`` tiles in
row-major order; the encoder returns ``[T, g * g, D]`` latents (``g = t / patch``
patches per tile side, row-major inside each tile), which reassemble into a latent
map ``[H / patch, W / patch, D]``: one vector per ``patch x patch`` grid pixels.
"""

from __future__ import annotations

from emmae.backend import backend_of
from emmae.runtime.kernels.filters import Array


def to_tiles(image: Array, tile_px: int) -> Array:
    """``[H, W]`` -> ``[T, 1, tile, tile]`` in row-major tile order.

    Raises:
        ValueError: ``H`` or ``W`` is not a multiple of ``tile_px``.
    """
    h, w = image.shape
    if h % tile_px or w % tile_px:
        raise ValueError(f"image {image.shape} is not whole {tile_px}-px tiles")
    tiles = image.reshape(h // tile_px, tile_px, w // tile_px, tile_px).transpose(0, 2, 1, 3)
    return backend_of(image).xp.ascontiguousarray(tiles.reshape(-1, 1, tile_px, tile_px))


def from_tiles(tiles: Array, grid_shape: tuple[int, int]) -> Array:
    """Inverse of :func:`to_tiles`: ``[T, 1, t, t]`` -> ``[H, W]`` with ``grid_shape = (H, W)``."""
    t = tiles.shape[-1]
    h, w = grid_shape
    image = tiles.reshape(h // t, w // t, t, t).transpose(0, 2, 1, 3)
    return image.reshape(h, w)


def latent_map(latents: Array, grid_shape: tuple[int, int], patch_px: int) -> Array:
    """Latents ``[T, g*g, D]`` of the tiles of a ``grid_shape`` image -> map ``[H/p, W/p, D]``."""
    n_tiles, n_patches, dim = latents.shape
    g = int(round(n_patches**0.5))
    rows, cols = grid_shape[0] // (g * patch_px), grid_shape[1] // (g * patch_px)
    if rows * cols != n_tiles or g * g != n_patches:
        raise ValueError(f"{n_tiles} tiles of {n_patches} patches do not cover a {grid_shape} grid")
    grid = latents.reshape(rows, cols, g, g, dim).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * g, cols * g, dim)
