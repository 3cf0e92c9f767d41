"""STAR files through ``starfile``, always written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import starfile

from emmae.io.atomic import atomic_path

StarData = pd.DataFrame | Mapping[str, pd.DataFrame | dict]


def write_star(path: str | Path, data: StarData) -> None:
    """Write one data block (a DataFrame) or several (name -> DataFrame loop or dict of single values).

    The file appears complete or not at all (temporary file + ``os.replace``).

    Raises:
        OutputError: the file could not be written; no temporary file is left.
    """
    blocks = {"": data} if isinstance(data, pd.DataFrame) else dict(data)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


def read_star(path: str | Path) -> dict[str, pd.DataFrame]:
    """Every data block of a STAR file, by block name ('' for ``data_``)."""
    blocks = starfile.read(path, always_dict=True)
    return {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
