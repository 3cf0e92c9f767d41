"""emmae-pick: pick particles in micrographs (files, folders, globs or a micrographs STAR).

Writes, in the output folder: <stem>_autopick.star per micrograph (RELION coordinates),
the RELION index autopick.star, particles.star (every pick with its micrograph name, for
cryoSPARC), micrographs.star (each micrograph's width, height and pixel size),
emmae-config.json (configuration, version and command line), <stem>_emmae.npz (the
particle map, for --rethreshold) and, when some micrographs could not be picked,
failed.txt (each with its reason). Outputs mirror the input sub-folders, so micrographs
of the same name in two folders do not collide.

Exit status: 0 all micrographs picked; 1 some could not be read (reported, skipped);
2 nothing could be done (bad arguments, configuration, model, an output folder that
cannot be written, or a full disk, which stops the run after writing the index files of
what was picked).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from emmae.backend import get_backend
from emmae.config import (
    EmmaeConfig,
    _apply_override,
    add_config_arguments,
    config_from_args,
    config_record,
    validate_config,
)
from emmae.errors import ConfigError, EmmaeError, MicrographError, OutputError
from emmae.io.atomic import write_bytes_atomic
from emmae.io.inputs import expand_inputs, micrographs_from_star
from emmae.io.mrc import read_micrograph
from emmae.io.picks import (
    micrograph_name,
    transform_xy,
    write_box,
    write_cbox,
    write_index,
    write_micrographs,
    write_particles,
    write_relion_coordinates,
)
from emmae.io.preview import write_preview
from emmae.memory import retain_freed_memory
from emmae.runtime.encoder import Encoder
from emmae.runtime.options import (
    add_common_arguments,
    add_output_arguments,
    check_threads,
    limit_cpu_threads,
    output_switches,
    progress_bar,
    setup_logging,
)
from emmae.runtime.picker import (
    Encoded,
    Picks,
    encode_prepared,
    finish,
    load_picks,
    needs_session,
    pick_micrograph,
    prepare,
    save_picks,
    session_from,
    session_sample_indices,
)
from emmae.runtime.session import Session

log = logging.getLogger("emmae.pick")
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2
RECORD = "emmae-config.json"
FAILED_LIST = "failed.txt"
SESSION_FILE = "session.json"  # the session's particle choice and its confidence
PLACEHOLDER_PIXEL_SIZE_A = 1.0  # what many programs write when they do not know the pixel size

EXAMPLES = """examples:
  emmae-pick Micrographs/*.mrc --diameter-A 300 -o picks
  emmae-pick Micrographs/ --recursive --diameter-px 56 --format star box cbox --flip-y
  emmae-pick MotionCorr/job002/corrected_micrographs.star --diameter-A 300   (names kept verbatim)
  emmae-pick --rethreshold picks --threshold 0.7     (re-pick in seconds, no encoding: only the more confident picks)
  emmae-pick --rethreshold picks --min-distance-A 200
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-pick", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="micrographs: .mrc files, folders (their *.mrc, any case), globs, or a micrographs .star (names kept verbatim)")
    group = parser.add_argument_group("picking")
    group.add_argument("--diameter-px", type=float, metavar="PX", help="particle diameter in pixels of the micrographs")
    group.add_argument("--diameter-A", type=float, metavar="A",
                       help="particle diameter in Angstrom (pixel size from each header, or --pixel-size-A)")
    group.add_argument("--min-distance-A", type=float, metavar="A",
                       help="no two picks closer than this (default: half the diameter); needs --diameter-A, or --diameter-px with --pixel-size-A")
    group.add_argument("--threshold", type=float, metavar="P",
                       help="keep candidates whose figure of merit (0-1, calibrated per session: 0.5 at the split between background "
                            "and particles, 0.9 at the median particle) reaches P (default 0.5); higher for precision, lower for recall; "
                            "with --rethreshold, re-cuts without encoding")
    group.add_argument("--model", type=Path, metavar="FILE", help="model bundle (.onnx; default: the bundled model)")
    group.add_argument("--batch-tiles", type=int, metavar="N",
                       help="64x64 tiles the encoder takes per run (default 256, a whole 1024-px grid); lower it when memory is short")
    group.add_argument("--recursive", action="store_true", help="also pick the micrographs in sub-folders of folder inputs")
    group.add_argument("--rethreshold", type=Path, metavar="DIR",
                       help="re-pick an earlier output folder DIR from its saved particle maps, without encoding: the run's recorded "
                            "options are kept and the options given now (--set, --min-distance-A, output options) change them")
    cluster = parser.add_argument_group("cluster (needs the dask extra)")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="pick on the Dask cluster of this scheduler (e.g. tcp://head:8786); the output folder must be shared with its workers")
    cluster.add_argument("--workers", type=int, metavar="N", help="pick on a local Dask cluster of N worker processes")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--out", type=Path, metavar="DIR", help="output folder (default: emmae_picks)")
    out.add_argument("--preview", action="store_true", help="also write <stem>_preview.png, the micrograph with its picks circled")
    add_output_arguments(parser, out)
    add_common_arguments(parser)
    add_config_arguments(parser)
    return parser


def _switches(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    return {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("model", "bundle"): args.model and str(args.model), ("model", "batch_tiles"): args.batch_tiles,
        ("backend", "device"): args.device, ("output", "preview"): args.preview or None,
        ("postprocess", "threshold"): args.threshold,
        **output_switches(args),
    }


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return with_min_distance(config_from_args(args, _switches(args)), args.min_distance_A)


def with_min_distance(config: EmmaeConfig, min_distance_A: float | None) -> EmmaeConfig:
    """``config`` with ``postprocess.min_distance_diameters`` set from a distance in Angstrom.

    Raises:
        ConfigError: the distance is not positive, or the diameter is not known in Angstrom.
    """
    if min_distance_A is None:
        return config
    if not min_distance_A > 0:
        raise ConfigError(f"--min-distance-A must be positive, got {min_distance_A}")
    pre = config.preprocess
    if pre.diameter_A is not None:
        diameter_A = pre.diameter_A
    elif pre.diameter_px is not None and pre.pixel_size_A is not None:
        diameter_A = pre.diameter_px * pre.pixel_size_A
    else:
        raise ConfigError("--min-distance-A needs the diameter in Angstrom: give --diameter-A, or --diameter-px with --pixel-size-A")
    data = config.model_dump(mode="json")
    data["postprocess"]["min_distance_diameters"] = min_distance_A / diameter_A
    return validate_config(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    retain_freed_memory()
    command = list(sys.argv if argv is None else argv)
    try:
        check_threads(args.threads)
        limit_cpu_threads(args.threads)
        if args.rethreshold:
            if args.inputs:
                raise EmmaeError("--rethreshold takes no micrographs: it re-picks the particle maps saved in its folder")
            record = read_record(args.rethreshold)
            return rethreshold(args.rethreshold, rethreshold_config(record["config"], args), command, record)
        config = _config(args)
        if args.batch_tiles is not None and args.batch_tiles < 1:
            raise ConfigError(f"--batch-tiles must be at least 1, got {args.batch_tiles}")
        items = collect_inputs(args.inputs, config, args.recursive)
        out = args.out or Path("emmae_picks")
        prepare_output_folder(out)
        if args.scheduler is not None or args.workers is not None:
            return pick_on_cluster(items, config, out, command, args)
        encoder = Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device),
                               batch_tiles=config.model.batch_tiles, threads=args.threads)
    except (EmmaeError, OSError, ValueError) as exc:
        log.error("%s", _one_line(exc))
        return EXIT_FAILED
    return pick_all(items, config, encoder, out, command)


def pick_on_cluster(items: list[Item], config: EmmaeConfig, out: Path, command: list[str], args: argparse.Namespace) -> int:
    """``--scheduler``/``--workers``: the same picks by a Dask cluster's workers. Raises ConfigError without dask."""
    try:
        from emmae.runtime import distributed
    except ImportError:
        raise ConfigError("--scheduler/--workers need dask.distributed, which is not installed: pip install 'cryo-emmae[dask]'") from None
    client = distributed.connect(args.scheduler, args.workers, args.threads)
    try:
        return distributed.pick_all_on_cluster(items, config, client, out, command)
    finally:
        distributed.close(client)


def _one_line(exc: BaseException) -> str:
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

    Stems mirror the micrographs' folders below the folder all of them share (a STAR's
    relative names as they are), so equal file names in different folders stay apart.

    Raises:
        EmmaeError: nothing to pick, no row of a STAR resolves, or two micrographs would
            write the same outputs.
        FileNotFoundError: an input matches nothing.
    """
    if not inputs:
        raise EmmaeError("no micrographs given (files, folders, globs or a micrographs .star)")
    stars = [item for item in inputs if item.lower().endswith(".star")]
    others = [item for item in inputs if not item.lower().endswith(".star")]
    pairs: list[tuple[Path, str, str | None]] = []
    for star in stars:
        pairs += [(path, name, _star_stem(name)) for path, name in star_micrographs(star, config.output.project_root)]
    files = expand_inputs(others, recursive=recursive) if others else []
    pairs += [(path, micrograph_name(path, config.output), None) for path in files]
    loose = [path for path, _, stem in pairs if stem is None]
    root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in loose])) if loose else None
    items = [Item(path, name, stem if stem is not None else str(Path(os.path.abspath(path)).relative_to(root).with_suffix("")))
             for path, name, stem in pairs]
    _check_unique_stems(items)
    return items


def _star_stem(name: str) -> str | None:
    """A STAR row's relative name without its suffix (its outputs' place), or None for an absolute or upward name."""
    rel = PurePath(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return str(rel.with_suffix(""))


def star_micrographs(star: str | Path, project_root: Path | None) -> list[tuple[Path, str]]:
    """The rows of a micrographs STAR; a missing micrograph is kept (reported when picked).

    Raises:
        EmmaeError: the STAR cannot be read, or none of its rows resolves under the project folder.
    """
    root = Path(project_root) if project_root is not None else Path.cwd()
    try:
        rows = micrographs_from_star(star, root)
    except (OSError, ValueError) as exc:
        raise EmmaeError(f"cannot read micrographs from {star}: {_one_line(exc)}") from None
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


def prepare_output_folder(out: Path) -> None:
    """Create ``out`` and check that files can be written in it.

    Raises:
        OutputError: it cannot be created, is not a folder, or is not writable (one line).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output folder {out} is a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise OutputError(f"output folder {out} is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")


def pick_all(items: list[Item], config: EmmaeConfig, encoder: Encoder, out: Path, argv: list[str]) -> int:
    """Pick every item into ``out``: per-micrograph files as each is done, then the index files."""
    sources = {item.stem: os.path.abspath(item.path) for item in items}  # for previews redrawn by --rethreshold
    try:
        write_record(out, config_record(config, argv) | {"sources": sources})
    except OutputError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    done: list[tuple[str, Picks]] = []
    failures: list[tuple[str, str]] = []
    stopped: OutputError | None = None
    warned_placeholder = False
    start = time.perf_counter()
    try:
        session, encoded = batch_session(items, config, encoder, out)
    except OutputError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    with progress_bar(items, len(items), "micrograph") as bar:
        for i, item in enumerate(bar, 1):
            try:
                if i - 1 in encoded:
                    sample = encoded.pop(i - 1)  # encoded once, for the session
                    result = finish(sample.prepared, config, encoder, sample.latents, session)
                else:
                    result = pick_micrograph(item.path, config, encoder, name=item.name, session=session)
            except FileNotFoundError:
                failures.append((str(item.path), "no such file"))
                log.error("skipped %s: no such file", item.path)
                continue
            except (MicrographError, EmmaeError, OSError) as exc:
                failures.append((str(item.path), getattr(exc, "reason", None) or _one_line(exc)))
                log.error("skipped %s", _one_line(exc) if isinstance(exc, MicrographError) else f"{item.path}: {_one_line(exc)}")
                continue
            if not warned_placeholder and _placeholder_pixel_size(result, config):
                warned_placeholder = True
                log.warning("%s: the header's pixel size is exactly %.1f A, a common placeholder; --diameter-A %g then means %.1f px. "
                            "If that is wrong, give --pixel-size-A (or --diameter-px)", item.path, PLACEHOLDER_PIXEL_SIZE_A,
                            config.preprocess.diameter_A, result.diameter_px)
            try:
                write_outputs(out, item.stem, result, config, item.path)
            except OutputError as exc:
                remove_outputs(out, item.stem)
                stopped = exc
                log.error("%s: stopping; %d micrographs were picked and are indexed", exc, len(done))
                break
            except (EmmaeError, OSError) as exc:  # e.g. the micrograph vanished before its preview was drawn
                remove_outputs(out, item.stem)
                failures.append((str(item.path), getattr(exc, "reason", None) or _one_line(exc)))
                log.error("skipped %s: %s", item.path, _one_line(exc))
                continue
            done.append((item.stem, result))
            log.info("[%d/%d] %s: %d particles in %.2f s (pixel %s, diameter %.1f px)", i, len(items), item.path.name, len(result),
                     sum(result.timings_s.values()), _pixel_text(result.pixel_size_A), result.diameter_px)
    try:
        write_session_files(out, done, config)
        write_failed_list(out, failures)
    except OutputError as exc:
        log.error("%s: the index files could not be written", exc)
        return EXIT_FAILED
    seconds = time.perf_counter() - start
    per = [sum(r.timings_s.values()) for _, r in done]
    log.info(
        "%d micrographs picked, %d failed, %d particles, %.1f s (median %.2f s per micrograph)",
        len(done), len(failures), sum(len(r) for _, r in done), seconds, statistics.median(per) if per else 0.0,
    )
    if failures:
        log.warning("%d micrographs failed (listed in %s):\n  %s", len(failures), out / FAILED_LIST,
                    "\n  ".join(f"{path}: {reason}" for path, reason in failures))
    if stopped is not None or not done:
        return EXIT_FAILED
    return EXIT_PARTIAL if failures else EXIT_OK


def batch_session(items: list[Item], config: EmmaeConfig, encoder: Encoder, out: Path) -> tuple[Session | None, dict[int, Encoded]]:
    """The batch's session, fitted on ``cluster.session_micrographs`` micrographs spread over it.

    Returns the session (None when the configuration needs none or no sample could be
    read) and the encoded samples by item index, so they are not encoded twice. The
    choice is logged and written to ``session.json`` in ``out``.
    """
    if not needs_session(config):
        return None, {}
    encoded: dict[int, Encoded] = {}
    for index in session_sample_indices(len(items), config.cluster.session_micrographs):
        item = items[index]
        try:
            encoded[index] = encode_prepared(prepare(item.path, config, encoder, name=item.name), encoder)
        except (MicrographError, EmmaeError, OSError) as exc:
            log.warning("session sample %s left out: %s", item.path, _one_line(exc))
    if not encoded:
        return None, {}
    session = session_from(list(encoded.values()), config, encoder)
    record = session.summary() | {"sample": [str(items[i].path) for i in sorted(encoded)]}
    try:
        write_bytes_atomic(out / SESSION_FILE, (json.dumps(record, indent=1) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"{out / SESSION_FILE}: {_one_line(exc)}") from exc
    return session, encoded


def _pixel_text(pixel_size_A: float | None) -> str:
    return "unknown" if pixel_size_A is None else f"{pixel_size_A:.4g} A"


def _placeholder_pixel_size(result: Picks, config: EmmaeConfig) -> bool:
    """The diameter came from Angstrom through a header pixel size of exactly 1.0 A."""
    pre = config.preprocess
    return pre.diameter_A is not None and pre.pixel_size_A is None and result.pixel_size_A == PLACEHOLDER_PIXEL_SIZE_A


def write_record(out: Path, record: dict) -> None:
    write_bytes_atomic(out / RECORD, json.dumps(record, indent=2).encode())


def write_failed_list(out: Path, failures: list[tuple[str, str]]) -> None:
    """``failed.txt``: one ``path<TAB>reason`` line per micrograph that failed (removed when none did)."""
    path = out / FAILED_LIST
    if not failures:
        path.unlink(missing_ok=True)
        return
    write_bytes_atomic(path, "".join(f"{name}\t{reason}\n" for name, reason in failures).encode())


OUTPUT_SUFFIXES = ("_autopick.star", ".box", ".cbox", "_preview.png", "_emmae.npz")


def remove_outputs(out: Path, stem: str, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> None:
    """Delete a micrograph's files (those of ``suffixes``) from ``out``."""
    for suffix in suffixes:
        (out / f"{stem}{suffix}").unlink(missing_ok=True)


def write_outputs(out: Path, stem: str, result: Picks, config: EmmaeConfig, source: Path | None = None) -> None:
    """The per-micrograph files of ``result`` (atomic writes); the preview re-reads ``source``.

    Raises:
        OutputError: a file could not be written.
    """
    folder = (out / stem).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None
    xy = transform_xy(result.xy, result.shape, config.output)
    scale = config.output.coordinate_scale
    box = result.diameter_px * scale * 1.5
    save_picks(out / f"{stem}_emmae.npz", result)
    if "star" in config.output.formats:
        write_relion_coordinates(out / f"{stem}_autopick.star", xy, result.score)
    if "box" in config.output.formats:
        write_box(out / f"{stem}.box", xy, box)
    if "cbox" in config.output.formats:
        write_cbox(out / f"{stem}.cbox", transform_xy(result.candidates_xy, result.shape, config.output), result.candidates_score, box,
                   particle_px=result.diameter_px * scale, size_xy=(result.shape[1] * scale, result.shape[0] * scale))
    if config.output.preview and source is not None:
        write_preview(out / f"{stem}_preview.png", read_micrograph(source).data, result.xy, result.diameter_px)


def write_session_files(out: Path, done: list[tuple[str, Picks]], config: EmmaeConfig) -> None:
    """The RELION index and the combined particles STAR of everything picked so far."""
    write_index(out / "autopick.star", [(r.name, str(out / f"{stem}_autopick.star")) for stem, r in done])
    write_micrographs(out / "micrographs.star", [(r.name, r.shape, r.pixel_size_A) for _, r in done])
    write_particles(out / "particles.star", [(r.name, transform_xy(r.xy, r.shape, config.output), r.score) for _, r in done])


def read_record(out: Path) -> dict:
    """The ``emmae-config.json`` of an output folder.

    Raises:
        EmmaeError: missing or unreadable.
    """
    if not out.is_dir():
        raise EmmaeError(f"--rethreshold {out}: no such folder")
    path = out / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise EmmaeError(f"{path} not found: {out} is not an emmae-pick or emmae-stream output folder") from None
    except (OSError, ValueError) as exc:
        raise EmmaeError(f"cannot read {path}: {_one_line(exc)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise EmmaeError(f"{path} holds no configuration")
    return record


def rethreshold_config(recorded: dict, args: argparse.Namespace) -> EmmaeConfig:
    """The recorded configuration with this command's --config, --set and switches applied over it.

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
        _apply_override(data, item)
    for (section, field), value in _switches(args).items():
        if value is not None:
            data.setdefault(section, {})[field] = value
    return with_min_distance(validate_config(data), args.min_distance_A)


def rethreshold(out: Path, config: EmmaeConfig, argv: list[str], record: dict | None = None) -> int:
    """Re-pick every micrograph in ``out`` (and its sub-folders, as the daemon writes them) from the saved
    particle maps under ``config`` (the command takes it from ``record``, the folder's ``emmae-config.json``,
    changed by its options). Files of formats no longer asked for, and previews that cannot be redrawn, are
    removed. The new record keeps the original command line (``record``'s) and adds ``argv``.

    Raises:
        EmmaeError: no particle maps in ``out``; OutputError: a file could not be written.
    """
    if record is None:
        try:
            record = read_record(out)
        except EmmaeError:
            record = {}
    saved = sorted(out.rglob("*_emmae.npz"))
    if not saved:
        raise EmmaeError(f"no saved particle maps (*_emmae.npz) in {out}")
    sources = record.get("sources") or {}
    new_record = config_record(config, record.get("argv") or []) | {
        "sources": sources, "rethreshold_argv": [*record.get("rethreshold_argv", []), argv],
    }
    write_record(out, new_record)
    formats = config.output.formats
    superseded = tuple(s for s, f in (("_autopick.star", "star"), (".box", "box"), (".cbox", "cbox")) if f not in formats)
    done = []
    no_preview = 0
    for path in saved:
        stem = str(path.relative_to(out))[: -len("_emmae.npz")]
        result = load_picks(path, config)
        source = Path(sources[stem]) if stem in sources else None
        if config.output.preview and (source is None or not source.is_file()):
            source = None
            no_preview += 1
        remove_outputs(out, stem, superseded + (("_preview.png",) if source is None or not config.output.preview else ()))
        write_outputs(out, stem, result, config, source)
        done.append((stem, result))
    write_session_files(out, done, config)
    if no_preview:
        log.warning("%d previews removed: their micrographs were not found; pick again to draw them", no_preview)
    log.info("re-picked %d micrographs: %d particles", len(done), sum(len(r) for _, r in done))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
