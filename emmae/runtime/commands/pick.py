"""emmae-pick: pick particles in micrographs (files, folders, globs or a micrographs STAR).

Writes, in the output folder (see emmae.runtime.outputs; the same files as emmae-stream):
<stem>_autopick.star per micrograph (RELION coordinates), the RELION index autopick.star,
particles.star (every pick with its micrograph name; a RELION particles file when every
pixel size is known, for cryoSPARC too), micrographs.star (each
micrograph's width, height and pixel size), emmae-config.json (configuration, version and
command line), emmae-session.json (the session and the micrographs it was fitted on),
<stem>_emmae.npz (what --rethreshold needs) and, when some micrographs could not be picked,
failed.txt (each with the kind of cause and the reason, tab-separated). A micrograph's
files go where RELION's Extract looks for its coordinates: its name below the project
folder (--project-root, default the current folder) without a job folder, so
relion_preprocess --coord_dir OUT/ --coord_suffix _autopick.star finds them. One command
at a time writes to an output folder (emmae.lock).

Exit status: 0 all micrographs picked; 1 some could not be read (reported, skipped);
2 nothing could be done (bad arguments, configuration, model, an output folder that
cannot be written or is in use, or a full disk, which stops the run after writing the
index files of what was picked).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from emmae.backend import check_threads, limit_cpu_threads
from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import ConfigError, EmmaeError, OutputError
from emmae.io.inputs import star_inputs
from emmae.io.layout import relative_folder
from emmae.io.picks import Picks
from emmae.memory import retain_freed_memory
from emmae.commandline import Parser, add_common_arguments, choose_gpu, progress_bar, setup_logging
from emmae.runtime.inputs import admit_all, collect_inputs, one_line
from emmae.runtime.jobs import Executor, Job, LocalExecutor, run_batch
from emmae.runtime.options import add_class_arguments, add_output_arguments, class_switches, default, output_switches, tiles_help
from emmae.runtime.outputs import FAILED_FILE, Failure, OutputFolder, with_star_optics
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.commands.rethreshold import rethreshold, rethreshold_config, with_min_distance

log = logging.getLogger("emmae.pick")
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2
PLACEHOLDER_PIXEL_SIZE_A = 1.0  # what many programs write when they do not know the pixel size

EXAMPLES = """examples:
  emmae-pick Micrographs/*.mrc --diameter-A 300 -o picks
  emmae-pick Micrographs/ --recursive --diameter-px 56 --format star box cbox --flip-y
  emmae-pick MotionCorr/job002/corrected_micrographs.star --diameter-A 300   (names kept verbatim)
  emmae-pick --rethreshold picks --threshold 0.7     (re-pick in seconds, no encoding: only the more confident picks)
  emmae-pick --rethreshold picks --min-distance-A 200
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emmae-pick", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="micrographs: .mrc files, folders (their *.mrc, any case), globs, or a micrographs .star (names kept verbatim)")
    group = parser.add_argument_group("picking")
    group.add_argument("--diameter-px", type=float, metavar="PX", help="particle diameter in pixels of the micrographs")
    group.add_argument("--diameter-A", type=float, metavar="A",
                       help="particle diameter in Angstrom (pixel size from each header, or --pixel-size-A)")
    group.add_argument("--min-distance-A", type=float, metavar="A",
                       help="no two picks closer than this (default: half the diameter); needs --diameter-A, or --diameter-px with --pixel-size-A")
    group.add_argument("-d", "--min-distance-px", "--distance", type=float, metavar="PX",
                       help="no two picks closer than this many pixels of the micrographs (default: half the diameter); needs --diameter-px, "
                            "or --diameter-A with --pixel-size-A")
    group.add_argument("-t", "--threshold", type=float, metavar="P",
                       help="keep candidates whose figure of merit (0-1, calibrated per session: 0.5 at the split between background "
                            f"and particles, 0.9 at the median particle) reaches P (default {default('postprocess.threshold'):g}); higher for precision, lower for recall; "
                            "with --rethreshold, re-cuts without encoding")
    group.add_argument("--model", type=Path, metavar="FILE", help="model bundle (.onnx; default: the bundled model)")
    group.add_argument("--batch-tiles", type=int, metavar="N", help=tiles_help())
    group.add_argument("--recursive", action="store_true", help="also pick the micrographs in sub-folders of folder inputs")
    group.add_argument("--rethreshold", type=Path, metavar="DIR",
                       help="re-pick an earlier output folder DIR from its saved particle maps, without encoding: the run's recorded "
                            "options are kept and the options given now (--set, --min-distance-A, output options) change them")
    add_class_arguments(group)
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
        **output_switches(args), **class_switches(args),
    }


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return with_min_distance(config_from_args(args, _switches(args)), args.min_distance_A, args.min_distance_px)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    retain_freed_memory()
    command = list(sys.argv if argv is None else argv)
    try:
        choose_gpu(args)
        check_threads(args.threads)
        limit_cpu_threads(args.threads)
        if args.rethreshold:
            if args.inputs:
                raise EmmaeError("--rethreshold takes no micrographs: it re-picks the particle maps saved in its folder")
            if not args.rethreshold.is_dir():
                raise EmmaeError(f"--rethreshold {args.rethreshold}: no such folder")
            with OutputFolder.open(args.rethreshold) as outputs:
                record = outputs.read_record()
                return rethreshold(outputs, rethreshold_config(record["config"], args, _switches(args)), command, record)
        config = with_star_optics(_config(args), star_inputs(args.inputs))
        if args.batch_tiles is not None and args.batch_tiles < 1:
            raise ConfigError(f"--batch-tiles must be at least 1, got {args.batch_tiles}")
        jobs, rejected = admit_all(collect_inputs(args.inputs, config, args.recursive), config)
        outputs = OutputFolder.open(args.out or Path("emmae_picks"))
    except (EmmaeError, OSError, ValueError) as exc:
        log.error("%s", one_line(exc))
        return EXIT_FAILED
    try:
        if args.scheduler is not None or args.workers is not None:
            return pick_on_cluster(jobs, rejected, config, outputs, command, args)
        encoder = Encoder.configured(config, args.threads)
        return pick_all(jobs, rejected, LocalExecutor(config, encoder), config, outputs, command, encoder.bundle.info.patch_px)
    except (EmmaeError, OSError, ValueError) as exc:
        log.error("%s", one_line(exc))
        return EXIT_FAILED
    finally:
        outputs.close()


def pick_on_cluster(jobs: list[Job], rejected: list[Failure], config: EmmaeConfig, outputs: OutputFolder, command: list[str],
                    args: argparse.Namespace) -> int:
    """``--scheduler``/``--workers``: the same picks by a Dask cluster's workers. Raises ConfigError without dask."""
    try:
        from emmae.runtime import distributed  # optional: dask.distributed
    except ImportError:
        raise ConfigError("--scheduler/--workers need dask.distributed, which is not installed: pip install 'cryo-emmae[dask]'") from None
    client = distributed.connect(args.scheduler, args.workers, args.threads)
    try:
        executor = distributed.DaskExecutor(client, config)
        return pick_all(jobs, rejected, executor, config, outputs, command, executor.patch_px, {"cluster": distributed.describe(client)})
    finally:
        distributed.close(client)


def pick_all(jobs: list[Job], rejected: list[Failure], executor: Executor, config: EmmaeConfig, outputs: OutputFolder, argv: list[str],
             patch_px: int, extra_record: dict | None = None) -> int:
    """Pick every job into ``outputs`` with ``executor``: the run record, the session, each micrograph's files, the index files."""
    # --rethreshold's previews redraw from the sources; they and the project folder are relative to the output folder
    sources = {job.stem: os.path.relpath(os.path.abspath(job.path), os.path.abspath(outputs.root)) for job in jobs}
    project = config.output.project_root or Path.cwd()
    start = time.perf_counter()
    try:
        outputs.write_record(config_record(config, argv) | {"sources": sources, "project_folder": relative_folder(project, outputs.root)}
                             | (extra_record or {}))
        result = run_batch(jobs, executor, config, outputs, patch_px, rejected, progress=lambda done: _with_bar(done, len(jobs)))
    except OutputError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    picked = [done.picks for done in result.picked]
    warn_placeholder(picked, config, [done.job.path for done in result.picked])
    per = [sum(p.timings_s.values()) for p in picked]
    log.info("%d micrographs picked, %d failed, %d particles, %.1f s (median %.2f s per micrograph)", len(picked), len(result.failures),
             sum(len(p) for p in picked), time.perf_counter() - start, statistics.median(per) if per else 0.0)
    if result.failures:
        log.warning("%d micrographs failed (listed in %s):\n  %s", len(result.failures), outputs.root / FAILED_FILE,
                    "\n  ".join(f"{f.micrograph}: {f.reason}" for f in result.failures))
    if result.stopped is not None or not picked:
        return EXIT_FAILED
    return EXIT_PARTIAL if result.failures else EXIT_OK


def _with_bar(items: Iterable, total: int) -> Iterator:
    with progress_bar(items, total, "micrograph") as bar:
        yield from bar


def warn_placeholder(picked: list, config: EmmaeConfig, paths: list[Path]) -> None:
    """Warn once when a diameter in Angstrom went through a header pixel size of exactly 1.0 A (a common placeholder)."""
    for picks, path in zip(picked, paths):
        if _placeholder_pixel_size(picks, config):
            log.warning("%s: the header's pixel size is exactly %.1f A, a common placeholder; --diameter-A %g then means %.1f px. "
                        "If that is wrong, give --pixel-size-A (or --diameter-px)", path, PLACEHOLDER_PIXEL_SIZE_A,
                        config.preprocess.diameter_A, picks.diameter_px)
            return


def _placeholder_pixel_size(result: Picks, config: EmmaeConfig) -> bool:
    """The diameter came from Angstrom through a header pixel size of exactly 1.0 A."""
    pre = config.preprocess
    return pre.diameter_A is not None and pre.pixel_size_A is None and result.pixel_size_A == PLACEHOLDER_PIXEL_SIZE_A


if __name__ == "__main__":
    sys.exit(main())
