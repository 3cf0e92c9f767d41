"""Expanding the user's list of micrographs: files, folders and globs."""

from __future__ import annotations

import glob
from pathlib import Path

from emmae.io.star import read_star


def micrographs_from_star(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """(file, name) of every row of a micrographs STAR (e.g. RELION's ``corrected_micrographs.star``).

    ``name`` is ``_rlnMicrographName`` verbatim, as RELION matches it; the file is that
    name under ``root`` (default: the current folder, RELION's project folder).

    Raises:
        ValueError: no block of the STAR file has ``_rlnMicrographName``.
    """
    blocks = [b for b in read_star(path).values() if "rlnMicrographName" in b.columns]
    if not blocks:
        raise ValueError(f"{path}: no loop with _rlnMicrographName")
    base = Path(root) if root is not None else Path.cwd()
    return [(base / name, str(name)) for name in blocks[0]["rlnMicrographName"]]


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
