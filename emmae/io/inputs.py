"""Expanding the user's list of micrographs: files, folders and globs."""

from __future__ import annotations

import glob
from pathlib import Path


def expand_inputs(inputs: list[str], patterns: tuple[str, ...] = ("*.mrc",)) -> list[Path]:
    """Files, folders (their ``patterns``) and globs -> sorted unique paths.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = [p for pattern in patterns for p in path.glob(pattern)]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(item)]
        if not matches:
            raise FileNotFoundError(f"no micrographs found for {item!r}")
        found += matches
    return sorted(set(found))
