"""Expanding the user's list of micrographs: files, folders and globs."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from pathlib import Path

from emmae.io.star import read_star

FINGERPRINT_BLOCK = 4096  # bytes read at each of the start, three inner points and the end of a file


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


def star_inputs(inputs: list[str]) -> list[str]:
    """The micrographs STAR files among a command line's inputs (by their ``.star`` suffix, in any case)."""
    return [item for item in inputs if item.lower().endswith(".star")]


def star_optics(path: str | Path) -> dict[str, float]:
    """Voltage (``voltage_kV``), spherical aberration (``spherical_aberration_mm``) and amplitude contrast
    (``amplitude_contrast``) of a micrographs STAR's first optics group; those it lacks are left out.

    Raises:
        OSError, ValueError: the file cannot be read as STAR.
    """
    optics = read_star(path).get("optics")
    if optics is None or len(optics) == 0:
        return {}
    columns = {"rlnVoltage": "voltage_kV", "rlnSphericalAberration": "spherical_aberration_mm", "rlnAmplitudeContrast": "amplitude_contrast"}
    return {field: float(optics[column].iloc[0]) for column, field in columns.items() if column in optics.columns}


def folder_files(folder: Path, patterns: tuple[str, ...] = ("*.mrc",), recursive: bool = False) -> list[Path]:
    """The files in ``folder`` (and its sub-folders when ``recursive``) whose names match one of
    ``patterns`` regardless of case (``*.mrc`` finds ``a.MRC``). Hidden names (``.x.mrc``, e.g.
    macOS ``._`` files) and hidden sub-folders are left out."""
    wanted = [p.lower() for p in patterns]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [Path(root) / name for name in files
                  if not name.startswith(".") and any(fnmatch.fnmatchcase(name.lower(), p) for p in wanted)]
    return sorted(found)


def expand_inputs(inputs: list[str], patterns: tuple[str, ...] = ("*.mrc",), recursive: bool = False) -> list[Path]:
    """Files, folders (their files matching ``patterns`` in any case; sub-folders too when
    ``recursive``) and globs -> sorted unique paths.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = folder_files(path, patterns, recursive)
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(item)]
        if not matches:
            hint = "" if recursive or not path.is_dir() else " (its sub-folders are searched with --recursive)"
            stacks = folder_files(path, ("*.mrcs",), recursive) if path.is_dir() else []
            if stacks:
                hint = f" (its {len(stacks)} .mrcs files are stacks, movies, which are not picked: give the motion-corrected micrographs)"
            raise FileNotFoundError(f"no micrographs found for {item!r}{hint}")
        found += matches
    return sorted(set(found))


def content_fingerprint(path: str | Path) -> str:
    """A cheap digest of a file's content: its size and ``FINGERPRINT_BLOCK`` bytes at the start (the MRC header and
    its statistics), at a quarter, half and three quarters, and at the end.

    Raises:
        OSError: it cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        for at in sorted({0, size // 4, size // 2, 3 * size // 4, max(0, size - FINGERPRINT_BLOCK)}):
            handle.seek(at)
            digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()[:32]
