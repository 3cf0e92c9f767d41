"""``pick_micrograph``: the one call that the batch command, the daemon and the benches share."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from emmae.backend import to_host
from emmae.config import EmmaeConfig, PreprocessConfig, resolve_diameter_px
from emmae.io.coords import GridTransform
from emmae.io.atomic import atomic_path
from emmae.io.mrc import read_micrograph
from emmae.runtime.cluster import particle_region, smoothing_window
from emmae.runtime.encoder import Encoder
from emmae.runtime.filters import Array
from emmae.runtime.postprocess import Candidates, candidates, picks
from emmae.runtime.preprocess import Preprocessed, preprocess


@dataclass(frozen=True)
class Picks:
    """Particle picks of one micrograph, in its pixels (x = column, y = row, sub-pixel).

    ``xy``/``score``: the kept picks; ``candidates_xy``/``candidates_score``: every
    candidate before neighbour suppression and the border margin, for re-thresholding.
    """

    name: str
    shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float | None
    diameter_px: float
    xy: np.ndarray
    score: np.ndarray
    candidates_xy: np.ndarray
    candidates_score: np.ndarray
    region: np.ndarray  # bool [h, w]: the particle cluster's latents, for re-thresholding
    transform: GridTransform
    diameter_grid_px: float
    patch_px: int
    timings_s: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.score)


@contextmanager
def _timed(timings: dict[str, float], name: str, sync) -> Iterator[None]:
    start = time.perf_counter()
    yield
    sync()
    timings[name] = time.perf_counter() - start


def model_preprocess_config(config: EmmaeConfig, encoder: Encoder) -> PreprocessConfig:
    """The bundle's training preprocessing, with the user's mode, diameter and pixel size."""
    user = config.preprocess
    trained = PreprocessConfig(**encoder.bundle.info.preprocess)
    return trained.model_copy(update={"mode": user.mode, "diameter_px": user.diameter_px, "diameter_A": user.diameter_A, "pixel_size_A": user.pixel_size_A})


@dataclass(frozen=True)
class Prepared:
    """A micrograph read and preprocessed, ready for the encoder (the first pipeline stage)."""

    label: str
    shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float | None
    diameter_px: float
    grid: Preprocessed
    timings_s: dict[str, float]


def prepare(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None, pixel_size_A: float | None = None) -> Prepared:
    """Read (a path) or take (an array ``[row, col]``) one micrograph and preprocess it with the bundle's settings.

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    backend = encoder.backend
    timings: dict[str, float] = {}
    with _timed(timings, "read", lambda: None):
        if isinstance(source, (str, Path)):
            mic = read_micrograph(source)
            image, header_px, label = mic.data, mic.pixel_size_A, name or str(source)
        else:
            image, header_px, label = np.asarray(source, dtype=np.float32), pixel_size_A, name or "array"
    pre = model_preprocess_config(config, encoder)
    diameter_px = resolve_diameter_px(pre, header_px)
    with _timed(timings, "preprocess", backend.synchronize):
        grid = preprocess(image, pre, diameter_px, backend)
    pixel = header_px if pre.pixel_size_A is None else pre.pixel_size_A
    return Prepared(label, tuple(image.shape), pixel, diameter_px, grid, timings)


def finish(prepared: Prepared, config: EmmaeConfig, encoder: Encoder, latents: Array | None = None) -> Picks:
    """Encode, cluster and post-process a prepared micrograph (the second pipeline stage).

    ``latents``: the micrograph's latent map if it is already encoded (``encoder.encode``
    of ``prepared.grid.image``); the encoder is then not run and no encode time is recorded.
    """
    backend, grid = encoder.backend, prepared.grid
    timings = dict(prepared.timings_s)
    patch = encoder.bundle.info.patch_px
    if latents is None:
        with _timed(timings, "encode", backend.synchronize):
            latents = encoder.encode(grid.image)
    valid = tuple(-(-n // patch) for n in grid.transform.valid_shape)  # latents that cover the micrograph
    with _timed(timings, "cluster", backend.synchronize):
        window = smoothing_window(grid.diameter_grid_px, patch)
        region = to_host(particle_region(latents[: valid[0], : valid[1]], encoder.bundle.info.centroid_array(), encoder.bundle.info.particle_cluster, window, config.cluster))
    with _timed(timings, "postprocess", lambda: None):
        found = candidates(region, patch, grid.diameter_grid_px, config.postprocess)
        kept = picks(found, grid.diameter_grid_px, grid.transform.valid_shape, config.postprocess)
    return Picks(
        name=prepared.label, shape=prepared.shape, pixel_size_A=prepared.pixel_size_A,
        diameter_px=prepared.diameter_px, xy=grid.transform.grid_to_input(kept.xy), score=kept.score,
        candidates_xy=grid.transform.grid_to_input(found.xy), candidates_score=found.score, region=region,
        transform=grid.transform, diameter_grid_px=grid.diameter_grid_px, patch_px=patch, timings_s=timings,
    )


def pick_micrograph(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None, pixel_size_A: float | None = None) -> Picks:
    """Pick one micrograph (a path, or an array ``[row, col]``) with an opened encoder: :func:`prepare` then :func:`finish`.

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    return finish(prepare(source, config, encoder, name, pixel_size_A), config, encoder)


def repick(previous: Picks, config: EmmaeConfig) -> Picks:
    """New candidates and picks from ``previous.region`` under ``config.postprocess`` (no encoding)."""
    found = candidates(previous.region, previous.patch_px, previous.diameter_grid_px, config.postprocess)
    kept = picks(found, previous.diameter_grid_px, previous.transform.valid_shape, config.postprocess)
    t = previous.transform
    return replace(
        previous, xy=t.grid_to_input(kept.xy), score=kept.score, candidates_xy=t.grid_to_input(found.xy),
        candidates_score=found.score, timings_s={},
    )


def save_picks(path: Path, result: Picks) -> None:
    """Everything needed to re-threshold ``result`` later, as one ``.npz`` (atomic)."""
    t = result.transform
    meta = {"name": result.name, "shape": list(result.shape), "pixel_size_A": result.pixel_size_A, "diameter_px": result.diameter_px,
            "diameter_grid_px": result.diameter_grid_px, "patch_px": result.patch_px,
            "transform": [list(t.input_shape), list(t.valid_shape), list(t.padded_shape)]}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, region=result.region, meta=np.array(json.dumps(meta)))


def load_picks(path: Path, config: EmmaeConfig) -> Picks:
    """Re-create a :class:`Picks` from :func:`save_picks` output, picked under ``config``."""
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        region = saved["region"].astype(bool)
    shapes = [tuple(s) for s in meta["transform"]]
    empty = np.zeros((0, 2))
    base = Picks(
        name=meta["name"], shape=tuple(meta["shape"]), pixel_size_A=meta["pixel_size_A"], diameter_px=meta["diameter_px"],
        xy=empty, score=np.zeros(0), candidates_xy=empty, candidates_score=np.zeros(0), region=region,
        transform=GridTransform(*shapes), diameter_grid_px=meta["diameter_grid_px"], patch_px=meta["patch_px"],
    )
    return repick(base, config)


__all__ = ["Candidates", "Picks", "Prepared", "finish", "load_picks", "pick_micrograph", "prepare", "repick", "save_picks"]
