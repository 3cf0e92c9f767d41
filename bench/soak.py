"""The daemon under abuse: kill -9 cycles against a live writer, and its idle cost.

    python bench/soak.py --minutes 10                 # kill -9 cycles: tried / lost / doubled / hung
    python bench/soak.py --minutes 5 --interval-s 6 --kill-s 2 8 --replace-fraction 0 --compare   # and equal to an uninterrupted run
    python bench/soak.py --idle --unsettled 2000 --others 5000 --seconds 20   # idle CPU

Soak: a writer thread lands synthetic micrographs (written in chunks, some
preallocated first, some replaced later) into a folder while ``emmae-stream`` runs on
it; every few seconds the daemon is killed with SIGKILL at a random moment and started
again. At the end a last ``--once`` run drains the folder. Reported (and written to
``bench/results/soak.json``): daemon starts (tried), micrographs whose final content
was never picked (lost), micrographs listed twice in the index or picked from an
older version without being picked again (doubled), and runs that did not stop within
a minute of SIGTERM (hung). With ``--compare`` an uninterrupted ``--once`` run then picks the
same final files into another output folder, and every per-micrograph STAR of the soak must
equal its own (coordinates and scores; ``--replace-fraction 0``, since a micrograph replaced
mid-session changes which versions the session was fitted on).

Idle: a folder with ``--unsettled`` empty ``*.mrc`` files (never complete) and
``--others`` other files; the daemon runs with its file-system observer and the CPU
time it uses over ``--seconds`` after a warm-up is reported as % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import starfile

from emmae.io.mrc import write_micrograph
from emmae.synth import SynthParams, make_micrograph

RESULTS = Path(__file__).resolve().parent / "results"
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)
CODE = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"


def start(watch: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = ["--watch", str(watch), "--out", str(out), "--diameter-px", "24", "--progress", "plain", *extra]
    return subprocess.Popen([sys.executable, "-c", CODE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(unsettled: int, others: int, seconds: float, poll: bool, warmup_s: float = 30.0) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        watch, out = Path(folder) / "session", Path(folder) / "out"
        for i in range(unsettled):
            sub = watch / f"GridSquare_{i // 500:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"empty_{i:05d}.mrc").touch()
        for i in range(others):
            sub = watch / f"GridSquare_{i // 500:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"other_{i:05d}.jpg").touch()
        daemon = start(watch, out, *(["--poll"] if poll else []))
        try:
            deadline = time.monotonic() + 120
            while not (out / "emmae-journal.sqlite").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(warmup_s)  # settle_s and the first scans: every file seen and read once, then idle
            before, t0 = cpu_s(daemon.pid), time.monotonic()
            time.sleep(seconds)
            used, elapsed = cpu_s(daemon.pid) - before, time.monotonic() - t0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=60)
    return {"unsettled": unsettled, "others": others, "seconds": round(elapsed, 1), "observer": not poll,
            "cpu_percent_of_a_core": round(100 * used / elapsed, 2)}


class Writer(threading.Thread):
    """Lands micrographs: plain chunked writes, preallocated files filled later, and replacements of earlier ones."""

    def __init__(self, watch: Path, seed: int, interval_s: float, replace_fraction: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.watch, self.rng, self.interval_s, self.replace_fraction = watch, random.Random(seed), interval_s, replace_fraction
        self.final: dict[str, int] = {}  # name -> seed of its final content
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name = f"mic_{i:05d}.mrc"
            if self.final and self.rng.random() < self.replace_fraction:
                name = self.rng.choice(sorted(self.final))  # a new version of an earlier micrograph
            seed = self.rng.randrange(1 << 30)
            self.land(name, seed)
            self.final[name] = seed
            i += 1
            self.stop.wait(self.interval_s)

    def land(self, name: str, seed: int) -> None:
        tmp = self.watch / f".{name}.part"
        write_micrograph(tmp, make_micrograph(PARAMS, seed=seed).image, 4.0)
        payload = tmp.read_bytes()
        tmp.unlink()
        target = self.watch / name
        how = self.rng.random()
        if how < 0.3:  # preallocated, then filled in chunks with pauses
            with open(target, "wb") as handle:
                handle.truncate(len(payload))
            with open(target, "r+b") as handle:
                for start in range(0, len(payload), 65536):
                    handle.seek(start)
                    handle.write(payload[start : start + 65536])
                    handle.flush()
                    time.sleep(0.05)
        elif how < 0.6:  # chunked append
            with open(target, "wb") as handle:
                for start in range(0, len(payload), 65536):
                    handle.write(payload[start : start + 65536])
                    handle.flush()
                    time.sleep(0.05)
        else:  # written elsewhere, moved in
            tmp = self.watch / f".{name}.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, target)


def soak(minutes: float, seed: int, interval_s: float, kill_s: tuple[float, float] = (2.0, 15.0), replace_fraction: float = 0.1,
         compare: bool = False) -> dict:
    rng = random.Random(seed)
    tried = hung = kills = 0
    with tempfile.TemporaryDirectory() as folder:
        watch, out = Path(folder) / "session", Path(folder) / "out"
        watch.mkdir()
        writer = Writer(watch, seed, interval_s, replace_fraction)
        writer.start()
        end = time.monotonic() + minutes * 60
        options = ("--settle-s", "1", "--poll-interval-s", "0.5")
        while time.monotonic() < end:
            daemon = start(watch, out, *options)
            tried += 1
            time.sleep(rng.uniform(*kill_s))
            if rng.random() < 0.2:
                daemon.send_signal(signal.SIGTERM)
                hung += _hung(daemon, 60)
            else:
                daemon.kill()
                daemon.communicate()
                kills += 1
        writer.stop.set()
        writer.join()
        final = start(watch, out, *options, "--once")
        tried += 1
        hung += _hung(final, 600)
        index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]["rlnMicrographName"]
        names = [Path(n).name for n in index]
        listed = set(names)
        doubled = len(names) - len(listed)
        lost = sum(name not in listed for name in writer.final)
        stale = _stale_picks(watch, out, writer.final)
        unequal = None
        if compare:  # the same final files, picked in one uninterrupted run
            hung += _hung(start(watch, Path(folder) / "uninterrupted", *options, "--once"), 600)
            unequal = _unequal_stars(out, Path(folder) / "uninterrupted", writer.final)
    return {"minutes": minutes, "seed": seed, "micrographs": len(writer.final), "tried": tried, "kills": kills, "lost": lost,
            "doubled": doubled + stale, "hung": hung, "replace_fraction": replace_fraction,
            "unequal_to_uninterrupted": unequal}


def _unequal_stars(out: Path, reference: Path, names: dict[str, int]) -> list[str]:
    """The micrographs whose coordinate file (x, y, figure of merit) differs from the uninterrupted run's."""
    columns = ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
    unequal = []
    for name in sorted(names):
        stem = name[: -len(".mrc")]
        try:
            a, b = (starfile.read(folder / f"{stem}_autopick.star")[columns].to_numpy() for folder in (out, reference))
        except (OSError, KeyError, ValueError):
            unequal.append(name)
            continue
        if a.shape != b.shape or not (abs(a - b) <= 1e-6).all():
            unequal.append(name)
    return unequal


def _hung(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``process`` to end; one still running after ``timeout_s`` is killed and counts as hung."""
    try:
        process.communicate(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return True


def _stale_picks(watch: Path, out: Path, final: dict[str, int]) -> int:
    """Picked micrographs whose journal entry does not match the file on disk (picked from an older version)."""
    from emmae.runtime.stream.journal import Journal

    journal = Journal(out)
    try:
        stale = 0
        for name in final:
            entry = journal.get(name)
            stat = os.stat(watch / name)
            if entry is not None and entry.state == "picked" and (entry.size, entry.mtime_ns, entry.ino) != (stat.st_size, stat.st_mtime_ns, stat.st_ino):
                stale += 1
        return stale
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: how long to kill and restart (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval-s", type=float, default=3.0, help="soak: seconds between landing micrographs")
    parser.add_argument("--kill-s", type=float, nargs=2, default=(2.0, 15.0), metavar=("MIN", "MAX"),
                        help="soak: the daemon runs a random time between MIN and MAX seconds before each kill (default 2 15)")
    parser.add_argument("--replace-fraction", type=float, default=0.1, help="soak: share of landings that replace an earlier micrograph")
    parser.add_argument("--compare", action="store_true", help="soak: then compare every STAR with an uninterrupted run's")
    parser.add_argument("--idle", action="store_true", help="measure the idle CPU instead")
    parser.add_argument("--unsettled", type=int, default=2000)
    parser.add_argument("--others", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20.0, help="idle: how long to measure")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="idle: wait this long after the start (every file seen and read once)")
    parser.add_argument("--poll", action="store_true", help="idle: polling only, no observer")
    args = parser.parse_args(argv)
    if args.idle:
        result = idle(args.unsettled, args.others, args.seconds, args.poll, args.warmup_s)
        name = f"idle-{args.unsettled}-{args.others}{'-poll' if args.poll else ''}.json"
    else:
        result = soak(args.minutes, args.seed, args.interval_s, tuple(args.kill_s), args.replace_fraction, args.compare)
        name = "soak-compare.json" if args.compare else "soak.json"
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
