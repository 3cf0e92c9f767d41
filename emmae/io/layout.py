"""Where a micrograph's output files go: where RELION looks for them.

RELION 3.1 finds a micrograph's coordinate file under ``--coord_dir`` at the
micrograph's name (as in the micrographs STAR, relative to the project folder)
without its suffix and without the job folder: ``MotionCorr/job002/Movies/a.mrc``
has its coordinates in ``<coord_dir>/Movies/a<coord_suffix>``, and ``Micrographs/a.mrc``
(no job folder) in ``<coord_dir>/Micrographs/a<coord_suffix>``. Every command writes
a micrograph's files at this stem, whatever form its input took (a micrographs STAR,
a folder, a glob, a watched folder), so RELION's Extract finds them as they are.

The one naming rule of both commands: a micrograph's name (``_rlnMicrographName``) is its
path below the project folder (:func:`project_folder`), else the path as given, with
``output.strip_prefix`` / ``output.add_prefix`` applied (:func:`micrograph_name`); a
micrographs STAR's rows keep their own names. Its stem is :func:`coordinate_stem` of the
name, or, for a name outside the project folder, the file's place below the folder its
inputs share (:func:`output_stem`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath, PurePosixPath

from emmae.config import OutputConfig

JOB_FOLDER = re.compile(r"job\d{3,}")  # RELION's job folders: job001, job002, ...


def coordinate_stem(name: str) -> str | None:
    """The output stem of the micrograph named ``name``: RELION's place for its coordinates.

    The name below the project folder without its suffix, from just after its job
    folder (the first ``jobNNN`` part after the first) when it has one. None for an
    absolute or upward name (no place below the project folder).
    """
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    parts = path.with_suffix("").parts
    job = next((i for i, part in enumerate(parts[1:-1], start=1) if JOB_FOLDER.fullmatch(part)), None)
    return str(PurePosixPath(*parts[job + 1:])) if job is not None else str(PurePosixPath(*parts))


def project_folder(output: OutputConfig, watched: str | Path | None = None) -> Path:
    """The folder names are written relative to: ``output.project_root``; by default the current folder (``emmae-pick``)
    or the watched folder's parent through its resolved spelling (``emmae-stream``, ``watched``)."""
    if output.project_root is not None:
        return Path(output.project_root)
    return Path(os.path.dirname(os.path.realpath(watched))) if watched is not None else Path.cwd()


def micrograph_name(path: str | PurePath, output: OutputConfig, root: Path | None = None) -> str:
    """The name written as ``_rlnMicrographName``: the path below the project folder ``root`` (default
    :func:`project_folder`) when the file lies there, else the path as given; then ``strip_prefix`` removed and
    ``add_prefix`` added, as explicit switches."""
    root = project_folder(output) if root is None else root
    return prefixed(below(Path(path), root) or str(path), output)


def below(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` when it lies below it (as spelled; else through the folder's resolved spelling;
    else both resolved), or None."""
    inner = Path(os.path.abspath(path))
    for outer in (Path(os.path.abspath(root)), Path(os.path.realpath(root))):
        try:
            return str(inner.relative_to(outer))
        except ValueError:
            continue
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def prefixed(name: str, output: OutputConfig) -> str:
    """``name`` with ``strip_prefix`` removed and ``add_prefix`` added (explicit switches)."""
    if output.strip_prefix and name.startswith(output.strip_prefix):
        name = name[len(output.strip_prefix) :]
    return output.add_prefix + name


def output_stem(name: str, path: str | Path, base: str | Path) -> str:
    """Where a micrograph's files go: :func:`coordinate_stem` of its ``name``; for a name outside the project folder,
    the file's place below ``base`` (the folder the inputs share, or the watched folder) without its suffix, else its
    file name."""
    stem = coordinate_stem(name)
    if stem is not None:
        return stem
    try:
        return str(Path(path).relative_to(base).with_suffix(""))
    except ValueError:
        return str(Path(Path(path).name).with_suffix(""))


def tail_below(root: Path, spelled: str, suffixes: tuple[str, ...]) -> str | None:
    """The longest tail of the stem ``spelled`` (written from another folder, or before ``root`` moved) with a file of one
    of ``suffixes`` below ``root``; None when there is none. Never a path out of ``root``."""
    parts = Path(spelled).parts
    for start in range(len(parts)):
        tail = os.path.join(*parts[start:])
        if ".." in parts[start:] or os.path.isabs(tail):
            continue
        if any(os.path.exists(os.path.join(root, tail + suffix)) for suffix in suffixes):
            return tail
    return None


def relative_folder(folder: str | Path, base: str | Path) -> str:
    """``folder`` relative to ``base`` (both resolved), e.g. a run record's project folder from its output folder."""
    return os.path.relpath(os.path.realpath(folder), os.path.realpath(base))
