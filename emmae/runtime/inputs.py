"""A batch's inputs: the micrographs named on the command line, each named once (:func:`emmae.io.layout.micrograph_name`,
the rule ``emmae-stream`` follows too) and admitted once (:func:`emmae.runtime.jobs.admit`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import ConfigError, EmmaeError, MicrographError
from emmae.io.inputs import expand_inputs, micrographs_from_star, star_inputs
from emmae.io.layout import coordinate_stem, micrograph_name, output_stem, project_folder
from emmae.runtime.jobs import Job, admit, failure_kind, reason_of
from emmae.runtime.outputs import Failure

log = logging.getLogger("emmae.pick")


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, EmmaeError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


@dataclass(frozen=True)
class Item:
    """One micrograph to pick: its file, the name written to the outputs, and its output stem."""

    path: Path
    name: str
    stem: str


def collect_inputs(inputs: list[str], config: EmmaeConfig, recursive: bool = False) -> list[Item]:
    """Every micrograph named on the command line, with names and output stems.

    A file's name is its path below the project folder (``--project-root``, else the
    current folder; a STAR's names as they are); its stem is where RELION looks for its
    coordinates (:func:`emmae.io.layout.coordinate_stem`). Files outside the project
    folder mirror their folders below the folder all of them share.

    Raises:
        EmmaeError: nothing to pick, no row of a STAR resolves, or two micrographs would
            write the same outputs.
        FileNotFoundError: an input matches nothing.
    """
    if not inputs:
        raise EmmaeError("no micrographs given (files, folders, globs or a micrographs .star)")
    stars = star_inputs(inputs)
    root = project_folder(config.output)
    others = [item for item in inputs if item not in stars]
    pairs: list[tuple[Path, str]] = []
    for star in stars:
        pairs += star_micrographs(star, root)
    files = expand_inputs(others, recursive=recursive) if others else []
    pairs += [(path, micrograph_name(path, config.output, root)) for path in files]
    loose = [path for path, name in pairs if coordinate_stem(name) is None]
    base = os.path.commonpath([os.path.abspath(p.parent) for p in loose]) if loose else ""
    items = [Item(path, name, output_stem(name, os.path.abspath(path), base)) for path, name in pairs]
    _check_unique_stems(items)
    return items


def star_micrographs(star: str | Path, root: Path) -> list[tuple[Path, str]]:
    """The rows of a micrographs STAR, resolved under the project folder ``root``; a missing micrograph is kept (reported
    when picked).

    Raises:
        EmmaeError: the STAR cannot be read, or none of its rows resolves under the project folder.
    """
    if not Path(star).is_file():
        raise EmmaeError(f"{star}: no such file; give a micrographs STAR (e.g. MotionCorr/job002/corrected_micrographs.star)")
    try:
        rows = micrographs_from_star(star, root)
    except (OSError, ValueError) as exc:
        hint = "" if "_rlnMicrographName" in str(exc) else "; a micrographs STAR has a loop with the column _rlnMicrographName"
        raise EmmaeError(f"cannot read micrographs from {star}: {one_line(exc)}{hint}") from None
    missing = [name for path, name in rows if not path.is_file()]
    if rows and len(missing) == len(rows):
        raise EmmaeError(
            f"{star}: none of its {len(rows)} micrographs is found under {root.resolve()} (e.g. {missing[0]}): "
            "run from the project folder the names are relative to, or give it with --project-root"
        )
    if missing:
        log.warning("%s: %d of %d micrographs not found under %s (e.g. %s); they are reported and skipped",
                    star, len(missing), len(rows), root.resolve(), missing[0])
    return rows


def _check_unique_stems(items: list[Item]) -> None:
    seen: dict[str, Path] = {}
    for item in items:
        if item.stem in seen:
            raise EmmaeError(f"two micrographs would write the same outputs {item.stem!r} ({seen[item.stem]} and {item.path}): "
                             "pick them into separate --out folders")
        seen[item.stem] = item.path


def admit_all(items: list[Item], config: EmmaeConfig) -> tuple[list[Job], list[Failure]]:
    """Every item admitted (header parsed and sized once, dimensions checked), and those refused with their reason."""
    jobs, rejected = [], []
    for item in items:
        try:
            jobs.append(admit(item.path, item.name, item.stem, config))
        except (MicrographError, ConfigError, OSError) as exc:
            rejected.append(Failure(str(item.path), failure_kind(exc), reason_of(exc)))
            log.error("skipped %s: %s", item.path, reason_of(exc))
    return jobs, rejected
