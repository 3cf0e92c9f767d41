"""Streaming under a simulated acquisition: latency from "file complete" to "STAR on disk".

    python bench/stream.py [--rate 1000 3000] [--count 30] [--burst 20] [--size 1024] [--settle-s 1]

Synthetic micrographs are written in 1 MB chunks at each ``--rate`` per hour (then a burst
of ``--burst`` at once) into a temporary folder that a daemon session (the bundled
model, settle time ``--settle-s``, 0.5 s polling, its reading, picking and writing
overlapped in the daemon's pipeline) watches. Reports per scenario the
latency p50/p95/max (completion of the file's last write to its first STAR on disk: a
micrograph picked again once the session is fixed counts at its first pick), the first
micrograph's latency less the settle time, throughput (every pick, re-picks included,
done), CPU use (cores busy) and the resident memory after every pick (its growth shows a
leak). Results: ``bench/results/stream-cpu.json``.

With ``--http`` each scenario runs twice, without and with the web view served by the
daemon's process (``emmae-stream --http``) and a client that, as an open page does, fetches
``/api/status`` every 2 s and the overlay of each new latest micrograph; throughput and
latency side by side, with their ratios: ``bench/results/stream-http-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from emmae.backend import get_backend
from emmae.config import validate_config
from emmae.io.mrc import write_micrograph
from emmae.memory import retain_freed_memory
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.stream.daemon import Daemon, StopFlag, run
from emmae.runtime.commands.demo import write_in_chunks
from emmae.runtime.web.live import serve_daemon
from emmae.synth import SynthParams, make_micrograph

log = logging.getLogger("bench.stream")
RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def acquire(folder: Path, images: list[Path], interval_s: float, completed: dict[str, float]) -> None:
    """Copy each staged micrograph into ``folder`` in chunks, one every ``interval_s`` (read from disk when it lands, so the
    staged micrographs never count in this process's memory)."""
    for i, staged in enumerate(images):
        start = time.monotonic()
        name = f"{folder.name}_{i:05d}.mrc"
        write_in_chunks(staged.read_bytes(), folder / name, pause_s=0.01)
        completed[name] = time.time()
        time.sleep(max(0.0, interval_s - (time.monotonic() - start)))


PAGE_REFRESH_S = 2.0  # the page's own refresh


def browse(base: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """What an open page fetches: the page once, then /api/status every ``PAGE_REFRESH_S`` and each new latest overlay."""
    def fetch(path: str) -> bytes:
        try:
            with urllib.request.urlopen(f"{base}{path}", timeout=30) as answer:
                counts["requests"] += 1
                return answer.read()
        except OSError:
            counts["errors"] += 1
            return b""

    for path in ("/", "/static/app.js", "/static/style.css"):
        fetch(path)
    shown = None
    while not stop.wait(PAGE_REFRESH_S):
        body = fetch("/api/status")
        latest = (json.loads(body).get("latest") or {}).get("stem") if body else None
        if latest is not None and latest != shown:
            shown = latest
            counts["overlays"] += len(fetch(f"/overlay.png?stem={urllib.request.quote(latest)}")) > 0


def scenario(name: str, images: list[Path], interval_s: float, encoder: Encoder, settle_s: float, root: Path,
             http: bool = False) -> dict:
    watch, out = root / name, root / f"{name}-out"
    watch.mkdir()
    config = validate_config({"preprocess": {"diameter_px": 56.0 * SIZE / 1024}, "stream": {"settle_s": settle_s, "poll_interval_s": 0.5}})
    session = Daemon(watch, out, config, encoder)
    server, page, browsing = None, threading.Event(), {"requests": 0, "errors": 0, "overlays": 0}
    if http:  # as emmae-stream --http serves it, and a page open on it
        server = serve_daemon(session, "127.0.0.1:0")
        threading.Thread(target=browse, args=(f"http://127.0.0.1:{server.port}", page, browsing), daemon=True).start()
    completed: dict[str, float] = {}
    writer = threading.Thread(target=acquire, args=(watch, images, interval_s, completed), daemon=True)
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    writer.start()
    memory, first_pick = [], {}

    def picked(path: Path, _particles: int) -> None:
        first_pick.setdefault(path.name, time.time())
        memory.append(rss_mb())

    session.recorder.on_picked = picked
    run(session, StopFlag(), once=True, until=lambda: not writer.is_alive())  # the daemon's own loop
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
    done = {e.path: e for e in session.journal.picked()}
    page.set()
    if server is not None:
        server.stop()
    session.release()
    latency = np.array([first_pick[name] - completed[name] for name in completed if name in first_pick])
    first = min(completed, key=completed.get)
    busy = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
    return {
        "scenario": name, "micrographs": len(done), "interval_s": interval_s, "settle_s": settle_s,
        "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
        "latency_max_s": float(latency.max()), "first_latency_less_settle_s": first_pick[first] - completed[first] - settle_s,
        "throughput_per_hour": len(done) / wall * 3600, "wall_s": wall,
        "cpu_cores_busy": busy, "rss_mb_after_each_pick": [round(m, 1) for m in memory],
        **({"http": browsing} if http else {}),
    }


def side_by_side(rows: list[dict]) -> list[dict]:
    """Each scenario without and with the web view (rows in pairs): throughput and latency, and their ratios."""
    pairs = []
    for without, served in zip(rows[::2], rows[1::2]):
        pairs.append({
            "scenario": without["scenario"], "throughput_per_hour": [without["throughput_per_hour"], served["throughput_per_hour"]],
            "throughput_ratio": served["throughput_per_hour"] / without["throughput_per_hour"],
            "latency_p50_s": [without["latency_p50_s"], served["latency_p50_s"]],
            "latency_p95_s": [without["latency_p95_s"], served["latency_p95_s"]],
            "latency_p50_ratio": served["latency_p50_s"] / without["latency_p50_s"],
            "cpu_cores_busy": [without["cpu_cores_busy"], served["cpu_cores_busy"]], "page_requests": served["http"],
        })
        p = pairs[-1]
        print(f"{p['scenario']:<24} per hour {p['throughput_per_hour'][0]:6.0f} / {p['throughput_per_hour'][1]:6.0f} "
              f"(x{p['throughput_ratio']:.3f}) | p50 {p['latency_p50_s'][0]:5.2f} / {p['latency_p50_s'][1]:5.2f} s "
              f"| p95 {p['latency_p95_s'][0]:5.2f} / {p['latency_p95_s'][1]:5.2f} s | {served['http']['requests']} requests")
    return pairs


SIZE = 1024


def main(argv: list[str] | None = None) -> int:
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, nargs="+", default=[1000.0], help="micrographs per hour of each paced scenario")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--long", type=int, default=0, help="also a long run: this many micrographs at once (memory plateau)")
    parser.add_argument("--http", action="store_true",
                        help="each scenario without and with the web view served and a page refreshing (stream-http-cpu.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("emmae").setLevel(logging.WARNING)
    retain_freed_memory()
    SIZE = args.size
    encoder = Encoder.open(backend=get_backend("auto"))
    params = SynthParams(shape=(args.size, args.size), diameter_px=56.0 * args.size / 1024)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "staged").mkdir()

        def images(n: int, seed: int) -> list[Path]:
            out = []
            for i in range(n):
                out.append(root / "staged" / f"{seed + i:05d}.mrc")
                write_micrograph(out[-1], make_micrograph(params, seed=seed + i).image, 1.0)
            return out

        served = (False, True) if args.http else (False,)
        for rate in args.rate:
            paced = images(args.count, 0)
            for http in served:
                rows.append(scenario(f"paced-{rate:g}-per-hour{'-http' * http}", paced, 3600 / rate, encoder, args.settle_s, root, http))
        burst = images(args.burst, 10_000)
        for http in served:
            rows.append(scenario(f"burst-{args.burst}{'-http' * http}", burst, 0.0, encoder, args.settle_s, root, http))
        if args.long:
            cycle = images(50, 20_000)  # 50 distinct micrographs, written over and over under new names
            rows.append(scenario(f"long-{args.long}", [cycle[i % 50] for i in range(args.long)], 0.0, encoder, args.settle_s, root))
    print(f"{'scenario':<24} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'first s':>8} {'per hour':>9} {'cores busy':>10} {'RSS first/last MB':>18}")
    for r in rows:
        mem = r["rss_mb_after_each_pick"]
        print(f"{r['scenario']:<24} {r['micrographs']:>4} {r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} {r['latency_max_s']:7.2f} "
              f"{r['first_latency_less_settle_s']:8.2f} "
              f"{r['throughput_per_hour']:9.0f} {r['cpu_cores_busy']:10.2f} {mem[0]:>8.0f} / {mem[-1]:<8.0f}")
        if len(mem) >= 20:
            tenth = len(mem) // 10
            print(f"  RSS MB by tenth of the run: {[round(float(np.median(mem[i * tenth:(i + 1) * tenth])), 1) for i in range(10)]}")
    print(f"({args.size}^2 micrographs, settle {args.settle_s} s, 0.5 s polling, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    pairs = side_by_side(rows) if args.http else None
    out = RESULTS / ("stream-http-cpu.json" if args.http else "stream-long-cpu.json" if args.long else "stream-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "cpu_count": os.cpu_count(), **({"with_web_view": pairs} if pairs else {}),
                               "results": rows}, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
