"""emmae-stream: pick micrographs as they land, keep the model loaded, lose nothing.

    emmae-stream --watch /data/session --diameter-A 300 [--out DIR] [--once] [--settle-s 5]
    emmae-stream --demo                 # a simulated session picked live, no data needed

Scans (every ``stream.poll_interval_s``, sooner on a file-system event) find candidate
files; each is handed on once it is stable for ``stream.settle_s`` and passes the strict
MRC check, and its header's size can hold particles of the given diameter. A file still
incomplete after ``stream.stale_after_s`` without a change is recorded as failed. A
pipeline of three threads joined by bounded queues (``stream.queue_depth``) reads and
preprocesses, picks with the model loaded once, and writes the outputs atomically, so
disk, CPU and accelerator overlap and memory stays bounded. Each result is recorded in the
SQLite journal (keyed on the path below the watched folder) and the session index
``autopick.star`` is rewritten atomically. A bad micrograph is recorded with its reason
and retried only if the file changes; one that failed for the configuration (no pixel
size for --diameter-A, too small for the diameter) also when the configuration changes;
one whose outputs could not be written (a full disk) after 30 s. A picked micrograph
replaced by a new version is picked again. At exit the failed micrographs are listed,
and written to failed.txt; the index files (autopick.star, particles.star,
micrographs.star) are those of emmae-pick. SIGINT, SIGTERM or a file named ``EMMAE_STOP`` created in the
watched folder since the daemon started stop it after the micrograph in hand (those queued
behind it are rolled back; during the start-up, before anything is picked; a stop file
older than the start is reported and ignored); ``--once`` picks the backlog and exits.
Restarting resumes from the journal, with the cut (threshold, postprocess values,
formats) of the output folder's emmae-config.json, a re-threshold's included. Outputs
go where RELION's Extract looks for them (the micrograph's name below the project root,
without a job folder). One daemon per output folder (``emmae.lock``).
On a terminal a status line (rate, queue, last latency, particles) is redrawn under the log.
With ``--http [HOST:]PORT`` a read-only web view of the session is served while the daemon
runs (127.0.0.1 when only a port is given; another host needs a token, see emmae-view);
with ``--demo`` it stays up after the demo until Ctrl-C.
With ``--adapt N`` the model is fine-tuned on the first N picked micrographs in a separate
process (emmae-adapt; needs torch) while picking goes on; then, between two micrographs,
the daemon switches to the adapted model (kept in OUT/emmae-adapt/ and across restarts),
fits its session on those micrographs and picks again what the old model picked
(``--adapt-then mark``: only records it). The journal names the model of every pick.
Exit status: 0 stopped cleanly (also during the start-up), every micrograph picked; 3 stopped
cleanly, some micrographs failed (listed in failed.txt); 2 bad arguments (no diameter, a -g N
that is not visible), configuration, model, a --watch-star file that is missing or not a
micrographs STAR, an output folder that cannot be used (busy, read-only, full, not a folder),
a cut other than the output folder's, or a --http address that cannot be served (malformed, in use).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path

from emmae.config import EmmaeConfig, add_config_arguments, config_from_args, config_record
from emmae.errors import ConfigError, EmmaeError, StarError
from emmae.io.layout import relative_folder
from emmae.io.star import read_star
from emmae.memory import retain_freed_memory
from emmae.backend import check_threads
from emmae.runtime.outputs import with_star_optics
from emmae.runtime.commands.demo import run_demo
from emmae.runtime.commands.rethreshold import restart_config
from emmae.commandline import Parser, add_common_arguments, choose_gpu, plain_text, setup_logging
from emmae.runtime.options import add_http_arguments, add_output_arguments, default, output_switches, tiles_help
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.stream.adapter import check_can_adapt
from emmae.runtime.stream.daemon import Daemon, StopFlag, run
from emmae.runtime.stream.status import StatusLine
from emmae.runtime.web.live import serve_daemon
from emmae.runtime.web.server import ViewServer, parse_address

log = logging.getLogger("emmae.stream")
EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3


def status_line(progress: str) -> StatusLine | None:
    """A status line redrawn under the log (``live``, or ``auto`` on a terminal), or None for plain log lines."""
    live = progress == "live" or (progress == "auto" and sys.stderr.isatty())
    return StatusLine(sys.stderr) if live else None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emmae-stream", description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch", type=Path, help="folder where micrographs land")
    parser.add_argument("--watch-star", type=Path, help="follow an upstream micrographs STAR (e.g. corrected_micrographs.star) instead; names kept verbatim")
    parser.add_argument("--demo", action="store_true", help="simulate a session in a temporary folder and pick it live")
    parser.add_argument("--demo-count", type=int, default=12, help="micrographs in the demo (default %(default)s)")
    parser.add_argument("--demo-per-hour", type=float, default=1200, help="acquisition rate of the demo (default %(default)g/h)")
    parser.add_argument("--diameter-px", type=float, metavar="PX", help="particle diameter in pixels of the micrographs")
    parser.add_argument("--diameter-A", type=float, metavar="A",
                        help="particle diameter in Angstrom (pixel size from each header, or --pixel-size-A)")
    parser.add_argument("-t", "--threshold", type=float, metavar="P",
                        help=f"keep candidates whose figure of merit (0-1, calibrated per session) reaches P "
                             f"(default {default('postprocess.threshold'):g})")
    parser.add_argument("--model", type=Path, help="model bundle (default: the bundled model)")
    parser.add_argument("--batch-tiles", type=int, metavar="N", help=tiles_help())
    parser.add_argument("--once", action="store_true", help="pick the backlog, then exit")
    parser.add_argument("--preview", action="store_true", help="also write <stem>_preview.png with the picks circled")
    parser.add_argument("--settle-s", type=float, help=f"seconds a file must stay unchanged (default {default('stream.settle_s'):g})")
    parser.add_argument("--poll-interval-s", type=float, help=f"seconds between scans (default {default('stream.poll_interval_s'):g})")
    parser.add_argument("--stale-after-s", type=float,
                        help="seconds an incomplete file may stay unchanged before it is recorded as failed "
                             f"(default {default('stream.stale_after_s'):g})")
    parser.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                        help="live: a status line redrawn under the log; plain: log lines only; auto (default): live on a terminal")
    parser.add_argument("--poll", action="store_true", help="polling only (automatic on NFS/SMB/CIFS, where no change events arrive)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="pick on the Dask cluster of this scheduler (needs the dask extra; the watched and output folders must be shared "
                             "with its workers); this process keeps discovery, the completeness gate and the journal")
    adapt = parser.add_argument_group("adaptation (needs the train extra: torch)")
    adapt.add_argument("--adapt", type=int, metavar="N",
                       help="once N micrographs are picked, fine-tune the model on them in a separate process (no labels), then pick with it")
    adapt.add_argument("--adapt-then", choices=("repick", "mark"),
                       help="what the old model picked: picked again with the adapted model (repick, default) or left, marked in the journal")
    adapt.add_argument("--adapt-epochs", type=int, metavar="N", help=f"most fine-tuning epochs (default {default('stream.adapt_epochs')})")
    adapt.add_argument("--adapt-budget-s", type=float, metavar="S", help=f"fine-tuning time budget in seconds (default {default('stream.adapt_budget_s'):g})")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--out", type=Path, metavar="DIR", help="output folder (default: WATCH/emmae_picks)")
    add_output_arguments(parser, output)
    add_http_arguments(parser, None)
    add_common_arguments(parser)
    add_config_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> EmmaeConfig:
    return config_from_args(args, {
        ("preprocess", "diameter_px"): args.diameter_px, ("preprocess", "diameter_A"): args.diameter_A,
        ("model", "bundle"): args.model and str(args.model), ("model", "batch_tiles"): args.batch_tiles, ("stream", "settle_s"): args.settle_s,
        ("stream", "poll_interval_s"): args.poll_interval_s, ("stream", "poll"): "always" if args.poll else None,
        ("stream", "stale_after_s"): args.stale_after_s, ("stream", "adapt_after"): args.adapt,
        ("stream", "adapt_then"): args.adapt_then, ("stream", "adapt_epochs"): args.adapt_epochs, ("stream", "adapt_budget_s"): args.adapt_budget_s,
        ("output", "preview"): args.preview or None, ("backend", "device"): args.device, ("postprocess", "threshold"): args.threshold,
        **output_switches(args),
    })


def _demo_config(argv: list[str]) -> tuple[argparse.Namespace, EmmaeConfig]:
    """The options and configuration of a demo's command line (see :mod:`emmae.runtime.commands.demo`)."""
    args = build_parser().parse_args(argv)
    config = _config(args)
    if config.stream.adapt_after:
        check_can_adapt()
    return args, config


def connect_cluster(scheduler: str | None, config: EmmaeConfig) -> object | None:
    """The Dask client of ``--scheduler`` with the encoder plugin registered (None without one).

    Raises:
        ConfigError: dask.distributed is missing, or combined with ``--adapt``.
    """
    if scheduler is None:
        return None
    if config.stream.adapt_after:
        raise ConfigError("--adapt and --scheduler cannot be combined: adapt in a single-process stream, or with emmae-adapt beforehand")
    try:
        from emmae.runtime import distributed  # optional: dask.distributed
    except ImportError:
        raise ConfigError("--scheduler needs dask.distributed, which is not installed: pip install 'cryo-emmae[dask]'") from None
    client = distributed.connect(scheduler, None)
    distributed.register(client, config)
    return client


def check_diameter(config: EmmaeConfig) -> None:
    """Refuse to start without a usable particle diameter.

    Raises:
        ConfigError: neither ``--diameter-px`` nor ``--diameter-A`` (nor their
            ``preprocess.`` settings), or one that is not a positive number.
    """
    pre = config.preprocess
    if pre.diameter_px is None and pre.diameter_A is None:
        raise ConfigError("no particle diameter: give --diameter-px or --diameter-A (or set preprocess.diameter_px or preprocess.diameter_A)")
    for flag, value in (("--diameter-px", pre.diameter_px), ("--diameter-A", pre.diameter_A), ("--pixel-size-A", pre.pixel_size_A)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a positive number, got {value}")


def check_watch_star(path: Path) -> None:
    """Refuse a ``--watch-star`` that is not there or not a micrographs STAR. One that is empty or caught half-written
    (the upstream job rewrites it in place) is not ready yet: the daemon starts and waits for it.

    Raises:
        ConfigError: missing, unreadable, or with data blocks but none with a loop with ``_rlnMicrographName``.
    """
    if not path.is_file():
        raise ConfigError(f"--watch-star {path}: no such file; give the micrographs STAR the upstream job writes "
                          "(e.g. MotionCorr/job002/corrected_micrographs.star)")
    try:
        blocks = read_star(path)
    except StarError as exc:
        log.warning("--watch-star %s cannot be read yet (%s): waiting for the upstream job to write it", path, exc.reason)
        return
    except OSError as exc:
        raise ConfigError(f"--watch-star {path}: {exc.strerror or exc}") from None
    if blocks and not any("rlnMicrographName" in block.columns for block in blocks.values()):
        raise ConfigError(f"--watch-star {path}: no loop with _rlnMicrographName; a micrographs STAR has a loop with that column")


def check_http(args: argparse.Namespace) -> None:
    """Refuse a malformed ``--http`` address, or ``--http-token`` without ``--http``, before anything starts.

    Raises:
        ConfigError: as said.
    """
    if args.http_token is not None and args.http is None:
        raise ConfigError("--http-token needs --http [HOST:]PORT")
    if args.http is not None:
        parse_address(args.http)


def start_view(args: argparse.Namespace, daemon: Daemon) -> ViewServer | None:
    """The web view of ``--http`` on the daemon's output folder, with its live figures (None without ``--http``).

    Raises:
        EmmaeError: the address cannot be served.
    """
    return None if args.http is None else serve_daemon(daemon, args.http, args.http_token)


def stop_flag() -> StopFlag:
    """The flag SIGINT and SIGTERM set from now on: a stop asked for during the start-up (the model loading, the session
    samples read back) is a clean stop as any other."""
    stop = StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handle)
    return stop


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = build_parser().parse_args(argv)
    status = status_line(args.progress)
    setup_logging(args, status)
    stop = stop_flag()
    retain_freed_memory()
    try:
        check_http(args)
        choose_gpu(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    if args.demo:
        try:
            return run_demo(args, argv, status, stop, _demo_config)
        except (EmmaeError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
    try:
        config = _config(args)
        check_diameter(config)  # before any micrograph is touched
        if config.stream.adapt_after:
            check_can_adapt()
        watch = args.watch or (args.watch_star.parent if args.watch_star else None)
        if watch is None or not watch.is_dir():
            raise EmmaeError(f"--watch needs an existing folder (or give --watch-star), got {watch}")
        if args.watch_star is not None:
            check_watch_star(args.watch_star)
            config = with_star_optics(config, [args.watch_star])
        check_threads(args.threads)
        out = args.out or watch / "emmae_picks"
        config, kept = restart_config(config, out, args)  # one cut per session: the folder's, or refused
        client = connect_cluster(args.scheduler, config)
        encoder = Encoder.configured(config, args.threads) if client is None else None
        if stop:
            log.info("stopped before the daemon started: nothing was picked")
            return EXIT_OK
        daemon = Daemon(watch, out, config, encoder, args.watch_star, status, args.threads, client, stop, started)
    except (EmmaeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        daemon.outputs.write_record(config_record(config, sys.argv if argv is None else argv) | kept
                                    | {"project_folder": relative_folder(daemon.admission.project_root, daemon.outputs.root)})
        server = start_view(args, daemon)
    except EmmaeError as exc:
        daemon.release()
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        run(daemon, stop, args.once)
        failed = bool(daemon.journal.failed())
    finally:
        if server is not None:
            server.stop()  # before the journal closes: no reader left behind
        daemon.release()
        if client is not None:
            client.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
