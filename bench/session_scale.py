"""What the daemon's bookkeeping costs late in a long session (no picking involved).

    python bench/session_scale.py [--sizes 1000 10000 50000]

For each size N: a watched folder with N micrograph files (empty placeholders: only
their names matter) all recorded as picked in the journal, as after N micrographs of
a session. Times (median of 5): opening the session (journal, picked set), one scan
of the folder with nothing new, one rewrite of the session index ``autopick.star``.
Scans run every poll interval (2 s); the index is rewritten at most once a second,
or every 10 rewrite-times when that is longer. Results: ``bench/results/session-scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emmae.config import validate_config
from emmae.runtime.stream.daemon import Daemon, StopFlag
from emmae.runtime.stream.journal import Journal

RESULTS = Path(__file__).resolve().parent / "results"


def populate(watch: Path, out: Path, n: int) -> None:
    """``n`` files in 100-file sub-folders, each recorded as picked."""
    journal = Journal(out)
    journal._db.execute("BEGIN")  # one transaction: this is set-up, not what is measured
    for i in range(n):
        path = watch / f"GridSquare_{i // 100:05d}" / f"FoilHole_{i:07d}_Data_fractions.mrc"
        path.parent.mkdir(exist_ok=True)
        path.touch()
        journal.mark_picked(str(path.relative_to(watch)), str(path), 300, str(out / f"{path.stem}_autopick.star"), {})  # keyed below the folder
    journal._db.execute("COMMIT")
    journal.close()


def median_s(action, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(n: int, root: Path) -> dict:
    watch, out = root / f"watch-{n}", root / f"out-{n}"
    watch.mkdir()
    out.mkdir()
    populate(watch, out, n)
    config = validate_config({"preprocess": {"diameter_px": 56.0}})

    def open_session() -> None:
        session = Daemon(watch, out, config, encoder=None)
        session.close(StopFlag())
        session.release()

    open_s = median_s(open_session)
    session = Daemon(watch, out, config, encoder=None)
    scan_s = median_s(session.scan)
    index_s = median_s(session.write_index)
    assert session.queued == 0 and session.admission.pending == 0, "a picked file was handed on again"
    session.close(StopFlag())
    session.release()
    return {"micrographs": n, "open_s": open_s, "scan_s": scan_s, "index_s": index_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(n, Path(folder)) for n in args.sizes]
    print(f"{'picked':>8} {'open s':>8} {'scan s':>8} {'index s':>8}")
    for r in rows:
        print(f"{r['micrographs']:>8} {r['open_s']:8.3f} {r['scan_s']:8.3f} {r['index_s']:8.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "session-scale.json").write_text(json.dumps({"results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
