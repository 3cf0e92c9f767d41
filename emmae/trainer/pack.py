"""A training pack: preprocessed working-grid images in one folder, to train on a machine without the data.

The folder holds two files, written and read with NumPy alone (no mrcfile, no
pydantic), so a GPU machine that has only torch and NumPy can train from it:

* ``images.npy``: uint8 ``[N, G, G]``, the grid images (grey levels 0-255 of the
  project's preprocessing, rounded to the nearest level), each in the top-left corner
  and zero beyond its own shape;
* ``index.json``: the format, the grid side ``G``, the preprocessing settings, and per
  micrograph its name, dataset, split, particle diameter (input pixels), grid-image
  shape (padded to whole tiles), content shape (before the padding) and source path
  (relative to the data folder).

:mod:`emmae.trainer.packer` builds one from dataset manifests; :mod:`emmae.trainer.multi` trains from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emmae.errors import EmmaeError
from emmae.io.atomic import atomic_path, write_bytes_atomic

PACK_FORMAT = 1
IMAGES, INDEX = "images.npy", "index.json"


class PackError(EmmaeError, ValueError):
    """A pack folder that is missing, incomplete or not of this format."""


@dataclass(frozen=True)
class PackedMicrograph:
    """One micrograph of a pack; shapes are ``(rows, cols)`` in grid pixels."""

    name: str
    dataset: str
    split: str
    diameter_px: float
    shape: tuple[int, int]
    valid: tuple[int, int]
    source: str

    def to_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape), "valid": list(self.valid)}


@dataclass(frozen=True)
class Pack:
    """Grid images ``[N, G, G]`` (uint8) and what each one is."""

    images: np.ndarray
    micrographs: list[PackedMicrograph]
    preprocess: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise PackError(f"pack images must be uint8 [N, G, G], got {self.images.dtype} {list(self.images.shape)}")
        if len(self.images) != len(self.micrographs):
            raise PackError(f"{len(self.images)} images but {len(self.micrographs)} index entries")
        for m in self.micrographs:
            if not (0 < m.valid[0] <= m.shape[0] <= self.grid_px and 0 < m.valid[1] <= m.shape[1] <= self.grid_px):
                raise PackError(f"{m.name}: content {m.valid} and shape {m.shape} do not fit a {self.grid_px}-px grid")

    @property
    def grid_px(self) -> int:
        return int(self.images.shape[1])

    @property
    def datasets(self) -> list[str]:
        """The datasets, sorted."""
        return sorted({m.dataset for m in self.micrographs})

    def indices(self, datasets: list[str] | tuple[str, ...]) -> list[int]:
        """Positions of the micrographs of ``datasets``."""
        return [i for i, m in enumerate(self.micrographs) if m.dataset in datasets]


def quantise(image: np.ndarray) -> np.ndarray:
    """A 0-255 float image as uint8, rounded to the nearest grey level."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)


def write_pack(folder: Path, pack: Pack) -> int:
    """Write ``pack`` to ``folder`` (created), each file atomically; returns the bytes written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / IMAGES) as tmp:
        np.save(tmp, pack.images, allow_pickle=False)
    index = {"format": PACK_FORMAT, "grid_px": pack.grid_px, "preprocess": pack.preprocess,
             "micrographs": [m.to_dict() for m in pack.micrographs]}
    write_bytes_atomic(folder / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    return sum((folder / name).stat().st_size for name in (IMAGES, INDEX))


def read_pack(folder: Path) -> Pack:
    """The pack in ``folder``.

    Raises:
        PackError: a file is missing or unreadable, or the index and the images disagree.
    """
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text())
        images = np.load(folder / IMAGES, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackError(f"{folder} is not a training pack ({exc}): build one with `python bench/gpu_train.py pack`") from None
    if index.get("format") != PACK_FORMAT:
        raise PackError(f"{folder}: pack format {index.get('format')}, this code reads {PACK_FORMAT}")
    try:
        micrographs = [PackedMicrograph(**{**m, "shape": tuple(m["shape"]), "valid": tuple(m["valid"])}) for m in index["micrographs"]]
    except (KeyError, TypeError) as exc:
        raise PackError(f"{folder / INDEX}: bad micrograph entry ({exc})") from None
    return Pack(images=images, micrographs=micrographs, preprocess=dict(index.get("preprocess") or {}))
