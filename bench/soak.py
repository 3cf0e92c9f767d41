"""The daemon under abuse: kill -9 cycles against a live writer, and its idle cost.

    python bench/soak.py --minutes 10                 # kill -9 cycles: tried / lost / doubled / hung
    python bench/soak.py --minutes 5 --interval-s 6 --kill-s 2 8 --replace-fraction 0 --compare   # and equal to an uninterrupted run
    python bench/soak.py --hostile --minutes 5 --interval-s 6 --kill-s 2 8      # moves, STAR rewrites, poison, stop files
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

Hostile (``--hostile``, ``bench/results/soak-hostile.json``): a RELION-like project
followed with ``--watch-star``: each micrograph lands in ``Movies/`` and then the
micrographs STAR is rewritten (atomically, in place in two halves, or emptied to
``data_optics`` first); one micrograph is poison (the daemon is killed whenever the
in-hand marker names it, as a crash in a native library would); between runs the whole
project (micrographs, STAR, output folder) is moved with ``mv`` or copied with ``cp -a``
(the old copy removed); runs end with SIGKILL, SIGTERM or a stop file created at a
random moment (during the start-up too), and a stop file left over now and then. Then a
last ``--once`` run and an uninterrupted run on the final files: lost, doubled, hung,
tracebacks, unequal good micrographs, and the poison file's journal entry.

Idle: a folder with ``--unsettled`` empty ``*.mrc`` files (never complete) and
``--others`` other files; the daemon runs with its file-system observer and the CPU
time it uses over ``--seconds`` after a warm-up is reported as % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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


POISON = "poison.mrc"
STAR = "corrected_micrographs.star"


class Project:
    """A RELION-like project that moves: ``Movies/`` filled by a :class:`Writer`, the micrographs STAR rewritten after
    each landing, the output folder ``AutoPick/``. ``lock`` is held by a landing and by a move."""

    def __init__(self, base: Path, seed: int, interval_s: float, poison_at: int) -> None:
        self.base, self.rng, self.poison_at = base, random.Random(seed + 1), poison_at
        self.folder = base / "project_00"
        (self.folder / "Movies").mkdir(parents=True)
        self.lock = threading.Lock()
        self.names: list[str] = []  # the STAR's rows, in order
        self.writer = Writer(self.folder / "Movies", seed, interval_s, replace_fraction=0.0)
        self.writer.land = self._land  # type: ignore[method-assign]
        self.moves = {"mv": 0, "cp -a": 0}
        self.rewrites = {"atomic": 0, "halves": 0, "emptied first": 0}
        self._write_star(atomic=True)

    def _land(self, name: str, seed: int) -> None:
        """Land ``name`` (the poison file first, once ``poison_at`` have landed), then rewrite the STAR with its row."""
        with self.lock:
            if len(self.names) == self.poison_at:
                Writer.land(self.writer, POISON, seed + 1)
                self.writer.final[POISON] = seed + 1
                self.names.append(f"Movies/{POISON}")
            Writer.land(self.writer, name, seed)
            self.names.append(f"Movies/{name}")
            self._write_star()

    def _write_star(self, atomic: bool = False) -> None:
        rows = "".join(f"{name}\t1\n" for name in self.names)
        text = ("data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnVoltage #2\n1\t300\n\n\n"
                f"data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnOpticsGroup #2\n{rows}\n")
        star = self.folder / STAR
        how = "atomic" if atomic else self.rng.choice(sorted(self.rewrites))
        if how == "atomic":
            (self.folder / f".{STAR}.tmp").write_text(text)
            os.replace(self.folder / f".{STAR}.tmp", star)
        else:
            first = "data_optics\n" if how == "emptied first" else text[: len(text) // 2]
            with open(star, "w") as handle:  # in place, as RELION does: a reader may catch it half-written
                handle.write(first)
                handle.flush()
                time.sleep(0.3)
                handle.seek(0)
                handle.truncate()
                handle.write(text)
        self.rewrites[how] += 1

    def move(self) -> None:
        """The whole project to a new folder: ``mv``, or ``cp -a`` and the old one removed."""
        with self.lock:
            target = self.base / f"project_{sum(self.moves.values()) + 1:02d}"
            how = self.rng.choice(("mv", "cp -a"))
            if how == "mv":
                os.rename(self.folder, target)
            else:
                subprocess.run(["cp", "-a", str(self.folder), str(target)], check=True)
                shutil.rmtree(self.folder)
            self.folder = target
            self.writer.watch = target / "Movies"
            self.moves[how] += 1

    def start(self, out: str = "AutoPick", *extra: str) -> subprocess.Popen:
        args = ["--watch-star", str(self.folder / STAR), "--project-root", str(self.folder), "--out", str(self.folder / out),
                "--diameter-px", "24", "--progress", "plain", "--settle-s", "1", "--poll-interval-s", "0.5", *extra]
        return subprocess.Popen([sys.executable, "-c", CODE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_on_poison(daemon: subprocess.Popen, marker: Path, poisoned: threading.Event) -> None:
    """Kill the daemon the moment its in-hand marker names the poison file (as a crash in a native library on it would);
    a marker older than this daemon is the one the last crash left, which it reads at its start."""
    started = time.time()
    while daemon.poll() is None:
        try:
            held = marker.read_bytes() if marker.stat().st_mtime >= started else b""
        except OSError:
            held = b""
        if held.endswith(POISON.encode()):
            daemon.kill()
            poisoned.set()
            return
        time.sleep(0.01)


def _run(project: Project, counts: dict, rng: random.Random, kill_s: tuple[float, float] | None, out: str = "AutoPick") -> tuple[bool, str, int | None]:
    """One daemon run on ``project`` (killed at once on the poison file), ended at a random moment in ``kill_s`` by SIGKILL,
    SIGTERM or a stop file; ``kill_s`` None: a ``--once`` run to its end. Returns (hung, its log, its exit status)."""
    daemon = project.start(out, *(() if kill_s else ("--once",)))
    counts["starts"] += 1
    poisoned = threading.Event()
    watcher = threading.Thread(target=_kill_on_poison, args=(daemon, project.folder / out / ".emmae-in-hand", poisoned), daemon=True)
    watcher.start()
    if kill_s is not None and not poisoned.wait(rng.uniform(*kill_s)) and daemon.poll() is None:
        ending = rng.random()
        if ending < 0.15:
            daemon.send_signal(signal.SIGTERM)
            counts["sigterm"] += 1
        elif ending < 0.3:
            (project.folder / "EMMAE_STOP").touch()  # at a random moment, the start-up included
            counts["stop_file"] += 1
        else:
            daemon.kill()
            counts["sigkill"] += 1
    try:
        _, log = daemon.communicate(timeout=60 if kill_s else 600)
        hung = False
    except subprocess.TimeoutExpired:
        daemon.kill()
        _, log = daemon.communicate()
        hung = True
    watcher.join()
    counts["sigkill_on_poison"] += poisoned.is_set()
    (project.folder / "EMMAE_STOP").unlink(missing_ok=True)  # one the daemon died before obeying
    return hung, log or "", None if poisoned.is_set() else daemon.returncode


def hostile(minutes: float, seed: int, interval_s: float, kill_s: tuple[float, float], poison_at: int = 12) -> dict:
    rng = random.Random(seed)
    counts = {"starts": 0, "sigkill": 0, "sigkill_on_poison": 0, "sigterm": 0, "stop_file": 0, "stop_file_left_over": 0}
    hung, tracebacks, bad_exits = 0, 0, []
    start_time = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        project = Project(Path(folder), seed, interval_s, poison_at)
        project.writer.start()
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            if rng.random() < 0.15:
                project.move()
            if rng.random() < 0.05:  # a stop file left from an earlier run: reported, not obeyed
                stop = project.folder / "EMMAE_STOP"
                stop.touch()
                os.utime(stop, (time.time() - 3600, time.time() - 3600))
                counts["stop_file_left_over"] += 1
            stuck, log, code = _run(project, counts, rng, kill_s)
            hung += stuck
            tracebacks += log.count("Traceback")
            if code not in (None, 0, 3, -signal.SIGKILL):
                bad_exits.append(code)
        project.writer.stop.set()
        project.writer.join()
        code = None
        while code is None:  # the last --once run (started again if the poison file kills it)
            stuck, log, code = _run(project, counts, rng, None)
            hung += stuck
            tracebacks += log.count("Traceback")
        final_code = code
        reference = project.start("Uninterrupted", "--once")  # the same final files, no kill, no poison
        hung += _hung(reference, 600)
        result = _hostile_verdict(project, final_code)
        result["unequal_to_uninterrupted"] = _unequal_stars(project.folder / "AutoPick" / "Movies", project.folder / "Uninterrupted" / "Movies",
                                                            {n: 0 for n in project.writer.final if n != POISON})
    kills = counts["sigkill"] + counts["sigkill_on_poison"]
    return {"minutes": minutes, "seed": seed, "micrographs": len(project.writer.final), "kills": kills, **counts, **result,
            "hung": hung, "tracebacks": tracebacks, "unexpected_exit_codes": bad_exits, "moves": project.moves,
            "star_rewrites": project.rewrites, "wall_s": round(time.monotonic() - start_time, 1)}


def _hostile_verdict(project: Project, final_code: int | None) -> dict:
    """Lost, doubled (listed twice, or picked from a file that is not the one on disk) and the poison file's fate."""
    from emmae.runtime.stream.journal import Journal

    out = project.folder / "AutoPick"
    index = starfile.read(out / "autopick.star", always_dict=True)["coordinate_files"]
    names = [str(n) for n in index["rlnMicrographName"]]
    good = [f"Movies/{n}" for n in project.writer.final if n != POISON]
    journal = Journal(out)
    try:
        stale = 0
        for name in good:
            entry, stat = journal.get(name), os.stat(project.folder / name)
            stale += entry is not None and entry.state == "picked" and (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns)
        poison = journal.get(f"Movies/{POISON}")
        failed = {e.path: e.reason for e in journal.failed()}
    finally:
        journal.close()
    absolute = [c for c in index["rlnMicrographCoordinates"] if os.path.isabs(str(c))]
    lost = [name for name in good if name not in names]
    return {"lost": len(lost), "lost_names": {name: failed.get(name, "not failed") for name in lost},
            "doubled": len(names) - len(set(names)) + stale,
            "final_exit_code": final_code, "poison": {"state": poison and poison.state, "reason": poison and poison.reason,
                                                       "listed": f"Movies/{POISON}" in names},
            "absolute_paths_in_index": len(absolute)}


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
    parser.add_argument("--hostile", action="store_true",
                        help="soak a --watch-star project that moves, with STAR rewrites, a poison micrograph and stop files")
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
    elif args.hostile:
        result = hostile(args.minutes, args.seed, args.interval_s, tuple(args.kill_s))
        name = "soak-hostile.json"
    else:
        result = soak(args.minutes, args.seed, args.interval_s, tuple(args.kill_s), args.replace_fraction, args.compare)
        name = "soak-compare.json" if args.compare else "soak.json"
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
