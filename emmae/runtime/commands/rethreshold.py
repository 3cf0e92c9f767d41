"""emmae-pick --rethreshold: an output folder re-picked from its saved particle maps under new values, without encoding.

The folder's run record (``emmae-config.json``) holds the configuration its picks were
cut with; a re-threshold applies the options given now over it, rewrites every
micrograph's files, the index files and the record (which keeps the original command
line beside each re-threshold's), so the record stays the one statement of the
folder's cut and formats that a restarted stream continues with.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from emmae.config import EmmaeConfig, apply_override, config_record, validate_config
from emmae.errors import ConfigError, EmmaeError
from emmae.runtime.outputs import RECORD_FILE, OutputFolder
from emmae.runtime.picking.picker import repick
from emmae.runtime.stream.recorder import recount_particles

log = logging.getLogger("emmae.pick")


def with_min_distance(config: EmmaeConfig, min_distance_A: float | None, min_distance_px: float | None = None) -> EmmaeConfig:
    """``config`` with ``postprocess.min_distance_diameters`` set from a distance in Angstrom or in pixels.

    Raises:
        ConfigError: both or a non-positive distance given, or the diameter is not known in the distance's unit.
    """
    if min_distance_A is None and min_distance_px is None:
        return config
    if min_distance_A is not None and min_distance_px is not None:
        raise ConfigError("give the minimum distance once: --min-distance-A or --min-distance-px")
    flag, distance = ("--min-distance-A", min_distance_A) if min_distance_A is not None else ("--min-distance-px", min_distance_px)
    if not distance > 0:
        raise ConfigError(f"{flag} must be positive, got {distance}")
    pre = config.preprocess
    pixel = pre.pixel_size_A
    diameter_A = pre.diameter_A if pre.diameter_A is not None else pre.diameter_px * pixel if pre.diameter_px is not None and pixel else None
    diameter_px = pre.diameter_px if pre.diameter_px is not None else pre.diameter_A / pixel if pre.diameter_A is not None and pixel else None
    diameter = diameter_A if min_distance_A is not None else diameter_px
    if diameter is None:
        unit = "Angstrom: give --diameter-A" if min_distance_A is not None else "pixels: give --diameter-px"
        raise ConfigError(f"{flag} needs the diameter in {unit}, or the other diameter with --pixel-size-A")
    data = config.model_dump(mode="json")
    data["postprocess"]["min_distance_diameters"] = distance / diameter
    return validate_config(data)


def rethreshold_config(recorded: dict, args: argparse.Namespace, switches: dict[tuple[str, str], Any]) -> EmmaeConfig:
    """The recorded configuration with this command's --config, --set and ``switches`` (its options) applied over it.

    Raises:
        ConfigError: an invalid file, override or value, or a recorded configuration this version cannot read.
    """
    data = copy.deepcopy(recorded)
    if args.config is not None:
        try:
            given = tomllib.loads(Path(args.config).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {args.config} is not valid TOML: {exc}") from None
        for section, values in given.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    for item in args.overrides or ():
        apply_override(data, item)
    for (section, field), value in switches.items():
        if value is not None:
            data.setdefault(section, {})[field] = value
    return with_min_distance(validate_config(data), args.min_distance_A, args.min_distance_px)


def rethreshold(outputs: OutputFolder, config: EmmaeConfig, argv: list[str], record: dict) -> int:
    """Re-pick every micrograph saved in ``outputs`` (sub-folders too, as the daemon writes them) under ``config``
    (the command takes it from ``record``, the folder's run record, changed by its options). Files of formats no
    longer asked for, and previews that cannot be redrawn, are removed. The new record keeps the original command
    line (``record``'s) and adds ``argv``.

    Raises:
        EmmaeError: no particle maps in the folder; OutputError: a file could not be written.
    """
    stems = outputs.saved_stems()
    if not stems:
        raise EmmaeError(f"no saved particle maps (*_emmae.npz) in {outputs.root}")
    listed = outputs.indexed_names()
    unsaved = sorted(set(listed) - set(stems))
    if unsaved:
        log.warning("%d micrographs have no saved particle map (e.g. %s_emmae.npz): their picks are kept as they are and still listed; "
                    "pick them again to re-threshold them", len(unsaved), outputs.root / unsaved[0])
    sources = record.get("sources") or {}
    project = outputs.root / record["project_folder"] if isinstance(record.get("project_folder"), str) else None
    outputs.write_record(config_record(config, record.get("argv") or []) | {
        "sources": sources, "rethreshold_argv": [*record.get("rethreshold_argv", []), argv],
        **({"project_folder": record["project_folder"]} if project is not None else {}),
    })
    superseded = tuple(s for s, f in (("_autopick.star", "star"), (".box", "box"), (".cbox", "cbox")) if f not in config.output.formats)
    rows, counts, no_preview = [], {}, 0
    for stem in stems:
        picks = repick(outputs.load(stem), config)
        counts[stem] = len(picks)
        source = outputs.root / sources[stem] if stem in sources else None  # relative to the folder (absolute in older records)
        if config.output.preview and (source is None or not source.is_file()):
            source = None
            no_preview += 1
        outputs.remove_micrograph(stem, superseded + (("_preview.png",) if source is None or not config.output.preview else ()))
        outputs.write_micrograph(stem, picks, config, source)
        rows.append(outputs.row(stem))
    rows += [replace(outputs.row(stem), name=listed[stem]) for stem in unsaved]
    outputs.write_index(sorted(rows, key=lambda row: row.stem), config, project)
    recount_particles(outputs, counts)
    outputs.redraw_classes(config.postprocess.keep_classes, config.postprocess.drop_classes)  # the montage shows the user's choice
    if no_preview:
        log.warning("%d previews removed: their micrographs were not found; pick again to draw them", no_preview)
    log.info("re-picked %d micrographs: %d particles", len(rows), sum(counts.values()))
    return 0


CUT_OUTPUT = ("formats", "flip_y", "coordinate_scale")  # with every postprocess value: how a folder's picks are cut and written
CUT_OPTIONS = ("threshold", "format", "flip_y", "scale")  # the command-line options that set them


def cut_of(config: EmmaeConfig) -> dict[str, Any]:
    """What decides which candidates a folder lists and in which files: the postprocess values and the output formats and switches."""
    data = config.model_dump(mode="json")
    return {**{f"postprocess.{k}": v for k, v in data["postprocess"].items()}, **{f"output.{k}": data["output"][k] for k in CUT_OUTPUT}}


def gives_cut(args: argparse.Namespace) -> bool:
    """The command line sets the cut itself: an option, a --set of one of its values, or a --config file with one."""
    keys = cut_of(EmmaeConfig())
    if any(getattr(args, name, None) not in (None, False) for name in CUT_OPTIONS):
        return True
    if any(item.replace(" ", "").split("=")[0] in keys for item in getattr(args, "overrides", None) or ()):
        return True
    try:
        given = tomllib.loads(Path(args.config).read_text()) if getattr(args, "config", None) is not None else {}
    except (OSError, tomllib.TOMLDecodeError):
        return True  # cannot tell (it was read once already): taken as given
    sections = {section: values for section, values in given.items() if isinstance(values, dict)}
    return any(f"{section}.{field}" in keys for section, values in sections.items() for field in values)


def restart_config(config: EmmaeConfig, folder: Path, args: argparse.Namespace) -> tuple[EmmaeConfig, dict]:
    """``config`` for a stream started on the output ``folder`` (see :func:`continued_cut`), and what of its run record a
    new record keeps (the re-thresholds' command lines).

    Raises:
        ConfigError: the command line asks another cut than the folder's.
    """
    try:
        record = OutputFolder(folder).read_record() if (folder / RECORD_FILE).is_file() else None
    except EmmaeError:
        record = None  # unreadable: written anew at the start
    if record is None:
        return config, {}
    kept = {"rethreshold_argv": record["rethreshold_argv"]} if isinstance(record.get("rethreshold_argv"), list) else {}
    return continued_cut(config, record, folder, gives_cut(args)), kept


def continued_cut(config: EmmaeConfig, record: dict, folder: Path, given: bool) -> EmmaeConfig:
    """``config`` for a stream restarted on ``folder``, whose run record ``record`` says how its picks were cut (by the
    stream, or by a re-threshold since): one cut per session. Not ``given`` on the command line: the folder's, said in
    a line. Given and the same: ``config``.

    Raises:
        ConfigError: given, and not the folder's (one line that says how to choose).
    """
    try:
        recorded = validate_config(record["config"])
    except (ConfigError, KeyError, TypeError):
        return config  # a record this version cannot read: nothing to continue
    mine, theirs = cut_of(config), cut_of(recorded)
    differ = [k for k in theirs if mine.get(k) != theirs[k]]
    if not differ:
        return config
    shown = ", ".join(f"{k.split('.')[1]} {_shown(theirs[k])}" for k in differ)
    if given:
        asked = ", ".join(f"{k.split('.')[1]} {_shown(mine[k])}" for k in differ)
        how = "re-thresholded to" if record.get("rethreshold_argv") else "picked with"
        raise ConfigError(f"{folder} was {how} {shown} (its emmae-config.json), this run asks {asked}: leave these options out to "
                          f"continue with the folder's, or change every micrograph's picks first with emmae-pick --rethreshold {folder} "
                          "and the new options, or give another --out")
    data = config.model_dump(mode="json")
    data["postprocess"] = recorded.model_dump(mode="json")["postprocess"]
    data["output"].update({k: theirs[f"output.{k}"] for k in CUT_OUTPUT})
    log.info("continuing %s with the cut its picks were made with (emmae-config.json): %s", folder, shown)
    return validate_config(data)


def _shown(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
