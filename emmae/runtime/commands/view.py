"""emmae-view: browse an output folder in a web browser, read-only.

    emmae-view emmae_picks/                       # http://127.0.0.1:8765/ on this machine
    emmae-view picks/ --http 0.0.0.0:8765         # reachable from other machines, with a token

Serves the page of emmae-stream --http for any output folder: a stream's, finished or
still running in another process (figures from its journal, opened read-only), or an
emmae-pick batch's (figures from its index files and saved picks). Nothing in the folder
is written. Bound to loopback (127.0.0.1) unless a host is given; then every request
needs a token (--http-token, or one generated and logged in the page's address). From
another machine, tunnel instead: ssh -L 8765:localhost:8765 USER@HOST, then open
http://localhost:8765/. Runs until SIGINT or SIGTERM.
Exit status: 0 stopped; 2 bad arguments, a folder that is not an output folder, or an
address that cannot be served (in use, not this machine's).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from emmae.errors import EmmaeError
from emmae.commandline import Parser, add_common_arguments, plain_text, setup_logging
from emmae.runtime.options import add_http_arguments
from emmae.runtime.web.folder import FolderView
from emmae.runtime.web.reading import is_output_folder
from emmae.runtime.web.server import serve

log = logging.getLogger("emmae.web")
EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_ADDRESS = "8765"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emmae-view", description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, metavar="OUTPUT_FOLDER", help="an emmae-stream or emmae-pick output folder")
    parser.add_argument("--project-root", type=Path, metavar="DIR",
                        help="folder the recorded micrograph names are relative to, to find the micrographs for the overlay "
                             "(default: as recorded, the watched folder's parent, the current folder)")
    add_http_arguments(parser, DEFAULT_ADDRESS)
    add_common_arguments(parser, device=False, threads=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    folder: Path = args.folder
    try:
        if not folder.is_dir():
            raise EmmaeError(f"{folder} is not a folder: give the output folder of emmae-stream or emmae-pick")
        if not is_output_folder(folder):
            raise EmmaeError(f"{folder} holds no picks, journal or index: give the output folder of emmae-stream or emmae-pick (-o/--out)")
        server = serve(FolderView(folder, project_root=args.project_root), args.http, args.http_token)
    except EmmaeError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stopped.set())
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        server.stop()
    log.info("web view stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
