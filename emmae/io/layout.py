"""Where a micrograph's output files go: where RELION looks for them.

RELION 3.1 finds a micrograph's coordinate file under ``--coord_dir`` at the
micrograph's name (as in the micrographs STAR, relative to the project folder)
without its suffix and without the job folder: ``MotionCorr/job002/Movies/a.mrc``
has its coordinates in ``<coord_dir>/Movies/a<coord_suffix>``, and ``Micrographs/a.mrc``
(no job folder) in ``<coord_dir>/Micrographs/a<coord_suffix>``. Every command writes
a micrograph's files at this stem, whatever form its input took (a micrographs STAR,
a folder, a glob, a watched folder), so RELION's Extract finds them as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

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
