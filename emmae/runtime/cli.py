"""``emmae-pick``: pick particles in micrographs (files, folders or globs).

Examples::

    emmae-pick Micrographs/*.mrc --diameter-A 300 --out picks
    emmae-pick MotionCorr/job002/Movies --diameter-px 56 --format star box cbox --flip-y
    emmae-pick --rethreshold picks --set postprocess.area_fraction=0.06   # no re-encoding

Writes ``<stem>_autopick.star`` per micrograph, the RELION index ``autopick.star``,
``particles.star`` (all picks with ``_rlnMicrographName``, for cryoSPARC),
``micrographs.star`` (each micrograph's width, height and pixel size),
``emmae-config.json`` (configuration, version, command line) and ``<stem>_emmae.npz``
(the particle map, for re-thresholding). Exit status: 0 all picked, 1 some
micrographs failed (reported, skipped), 2 nothing could be done (bad arguments,
configuration or model).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from emmae.backend import get_backend
from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import EmmaeError, MicrographError
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
from emmae.runtime.picker import Picks, load_picks, pick_micrograph, save_picks

log = logging.getLogger("emmae.pick")
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmae-pick", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="micrographs: .mrc files, folders, globs, or a micrographs .star (names kept verbatim)")
    parser.add_argument("--diameter-px", type=float, help="particle diameter in pixels of the micrographs")
    parser.add_argument("--diameter-A", type=float, help="particle diameter in Angstrom (pixel size from the header or --pixel-size-A)")
    parser.add_argument("--pixel-size-A", type=float, help="override the header's pixel size")
    parser.add_argument("--model", type=Path, help="model bundle (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=Path("emmae_picks"), help="output folder (default: emmae_picks)")
    parser.add_argument("--format", nargs="+", choices=["star", "box", "cbox"], help="per-micrograph files (default: star)")
    parser.add_argument("--flip-y", action="store_true", help="write y as ny - 1 - y (cryoSPARC Patch Motion micrographs)")
    parser.add_argument("--scale", type=float, help="multiply written coordinates (another binning)")
    parser.add_argument("--strip-prefix", help="remove this prefix from written micrograph names")
    parser.add_argument("--add-prefix", help="add this prefix to written micrograph names")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], help="compute device")
    parser.add_argument("--preview", action="store_true", help="also write <stem>_preview.png with the picks circled")
    parser.add_argument("--rethreshold", type=Path, metavar="OUT", help="re-pick from the particle maps saved in OUT (no encoding)")
    add_config_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return config_from_args(args, {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("preprocess", "pixel_size_A"): args.pixel_size_A, ("model", "bundle"): args.model and str(args.model),
        ("output", "formats"): args.format, ("output", "flip_y"): args.flip_y or None, ("output", "coordinate_scale"): args.scale,
        ("output", "strip_prefix"): args.strip_prefix, ("output", "add_prefix"): args.add_prefix, ("backend", "device"): args.device,
        ("output", "preview"): args.preview or None,
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    retain_freed_memory()
    try:
        config = _config(args)
        if args.rethreshold:
            return rethreshold(args.rethreshold, config, sys.argv if argv is None else argv)
        items = _inputs(args.inputs, config)
        if not items:
            raise EmmaeError("no micrographs given")
        _check_unique_stems([path for path, _ in items])
        encoder = Encoder.open(config.model.bundle, config.model.precision, get_backend(config.backend.device))
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    return pick_all(items, config, encoder, args.out, sys.argv if argv is None else argv)


def _inputs(inputs: list[str], config: EmmaeConfig) -> list[tuple[Path, str]]:
    """(file, name written to the outputs) for every micrograph named on the command line."""
    stars = [item for item in inputs if item.endswith(".star")]
    others = [item for item in inputs if not item.endswith(".star")]
    items = [pair for star in stars for pair in micrographs_from_star(star, config.output.project_root)]
    items += [(path, micrograph_name(path, config.output)) for path in (expand_inputs(others) if others else [])]
    return items


def _check_unique_stems(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise EmmaeError(f"two micrographs are named {path.stem!r} ({seen[path.stem]} and {path}): pick them into separate --out folders")
        seen[path.stem] = path


def pick_all(items: list[tuple[Path, str]], config: EmmaeConfig, encoder: Encoder, out: Path, argv: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "emmae-config.json", json.dumps(config_record(config, argv), indent=2).encode())
    done: list[tuple[str, Picks]] = []
    failed = 0
    start = time.perf_counter()
    for i, (path, name) in enumerate(progress(items), 1):
        try:
            result = pick_micrograph(path, config, encoder, name=name)
        except (MicrographError, EmmaeError) as exc:
            failed += 1
            log.error("skipped %s", exc)
            continue
        write_outputs(out, path.stem, result, config, path)
        done.append((path.stem, result))
        log.info("[%d/%d] %s: %d particles in %.2f s", i, len(items), path.name, len(result), sum(result.timings_s.values()))
    write_session_files(out, done, config)
    seconds = time.perf_counter() - start
    per = [sum(r.timings_s.values()) for _, r in done]
    log.info(
        "%d micrographs picked, %d failed, %d particles, %.1f s (median %.2f s per micrograph)",
        len(done), failed, sum(len(r) for _, r in done), seconds, statistics.median(per) if per else 0.0,
    )
    if not done:
        return EXIT_FAILED
    return EXIT_PARTIAL if failed else EXIT_OK


def progress(items: list) -> Iterable:
    """``items`` with a progress bar on an interactive terminal (tqdm, when installed)."""
    if not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit="micrograph", dynamic_ncols=True)


def write_outputs(out: Path, stem: str, result: Picks, config: EmmaeConfig, source: Path | None = None) -> None:
    """The per-micrograph files of ``result`` (atomic writes); the preview re-reads ``source``."""
    xy = transform_xy(result.xy, result.shape, config.output)
    box = result.diameter_px * config.output.coordinate_scale * 1.5
    save_picks(out / f"{stem}_emmae.npz", result)
    if "star" in config.output.formats:
        write_relion_coordinates(out / f"{stem}_autopick.star", xy, result.score)
    if "box" in config.output.formats:
        write_box(out / f"{stem}.box", xy, box)
    if "cbox" in config.output.formats:
        write_cbox(out / f"{stem}.cbox", transform_xy(result.candidates_xy, result.shape, config.output), result.candidates_score, box)
    if config.output.preview and source is not None:
        write_preview(out / f"{stem}_preview.png", read_micrograph(source).data, result.xy, result.diameter_px)


def write_session_files(out: Path, done: list[tuple[str, Picks]], config: EmmaeConfig) -> None:
    """The RELION index and the combined particles STAR of everything picked so far."""
    write_index(out / "autopick.star", [(r.name, str(out / f"{stem}_autopick.star")) for stem, r in done])
    write_micrographs(out / "micrographs.star", [(r.name, r.shape, r.pixel_size_A) for _, r in done])
    write_particles(out / "particles.star", [(r.name, transform_xy(r.xy, r.shape, config.output), r.score) for _, r in done])


def rethreshold(out: Path, config: EmmaeConfig, argv: list[str]) -> int:
    """Recompute every micrograph's picks in ``out`` (and its sub-folders, as the daemon writes them) from the saved particle maps."""
    saved = sorted(out.rglob("*_emmae.npz"))
    if not saved:
        raise EmmaeError(f"no saved particle maps (*_emmae.npz) in {out}")
    write_bytes_atomic(out / "emmae-config.json", json.dumps(config_record(config, argv), indent=2).encode())
    done = []
    for path in saved:
        stem = str(path.relative_to(out))[: -len("_emmae.npz")]
        result = load_picks(path, config)
        write_outputs(out, stem, result, config)
        done.append((stem, result))
    write_session_files(out, done, config)
    log.info("re-picked %d micrographs: %d particles", len(done), sum(len(r) for _, r in done))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
