"""STAR files through ``starfile``, always written atomically."""

from __future__ import annotations

import linecache
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import starfile

from emmae.errors import StarError
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
    """Every data block of a STAR file, by block name ('' for ``data_``).

    Raises:
        OSError: it cannot be opened.
        StarError: it cannot be parsed (a block without a body, a file caught half-written, not STAR).
    """
    linecache.checkcache(str(path))  # starfile reads lines through linecache: never a copy of an earlier version of the file
    try:
        blocks = starfile.read(path, always_dict=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's own errors (TypeError, IndexError, ...) on a malformed file
        linecache.clearcache()  # starfile clears it only after a file it could parse
        raise StarError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    return {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
