"""This tree against an earlier commit, in one run: picking time (bench/pick.py) and quality (bench/generalise.py).

    python bench/compare_commits.py COMMIT [--this COMMIT] [--rounds 2] [--count 5] [--quality generalise|pick-hash]

COMMIT (and ``--this``, else this working tree) is checked out into a temporary git worktree
(its ``bench/.cache`` is this tree's, so both use the same fold models). Each round runs the earlier commit's ``bench/pick.py``, then
this tree's, on the same synthetic micrographs (1024^2 and 4096^2); the medians per rule are
compared over the rounds. Then each tree's ``bench/generalise.py`` scores the real folds
(``--no-synthetic``) and the F1 of every fold and method is compared; or, with ``--quality
pick-hash``, this tree's ``bench/pick_hash.py`` picks every dev micrograph with each tree's
emmae (the bundled model) and their F1 and hashes are compared. For a change that
should not change behaviour: F1 equal within 0.002, time within 5 %.
Results: ``bench/results/compare-<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("bench.compare")


def run(tree: Path, script: str, args: list[str], script_tree: Path | None = None) -> None:
    """``script`` of ``script_tree`` (default ``tree``) run on ``tree``'s emmae."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # that tree's emmae, whatever is installed
    subprocess.run([sys.executable, str((script_tree or tree) / "bench" / script), *args], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pick_totals(tree: Path, count: int) -> dict[str, float]:
    """Median total ms per (size, rule) of one bench/pick.py run of ``tree`` (its committed pick-cpu.json is put back)."""
    results = tree / "bench" / "results" / "pick-cpu.json"
    kept = results.read_bytes() if results.is_file() else None
    try:
        run(tree, "pick.py", ["--count", str(count), "--sizes", "1024", "4096", "--device", "cpu"])
        rows = json.loads(results.read_text())["results"]
    finally:
        if kept is not None:
            results.write_bytes(kept)
    return {f"{r['size']} {r['rule']}": 1e3 * r["median_s"]["total"] for r in rows}


def fold_f1(tree: Path, out: Path, data: Path) -> dict[str, float]:
    run(tree, "generalise.py", ["--no-synthetic", "--resamples", "200", "--data", str(data), "--output", str(out)])
    return {f"{r['dataset']} | {r['method']}": r["f1"] for r in json.loads(out.read_text())["real"]}


def hash_f1(tree: Path, out: Path, data: Path) -> dict[str, float]:
    """This tree's ``bench/pick_hash.py`` on ``tree``'s emmae: F1 per dataset, and whether the picks are the same (the hash)."""
    run(tree, "pick_hash.py", ["--data", str(data), "--output", str(out)], script_tree=ROOT)
    rows = json.loads(out.read_text())["datasets"]
    return {f"{r['dataset']} | emmae-pick {r['sha256'][:12]}": r["f1"] for r in rows}


def _short(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _worktree(folder: Path, commit: str) -> Path:
    """``commit`` checked out in ``folder``, sharing this tree's bench cache (the fold models)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT, check=True, capture_output=True)
    (folder / "bench" / ".cache").symlink_to(HERE / ".cache")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit")
    parser.add_argument("--this", help="a later commit to compare (default: this working tree)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--quality", choices=["generalise", "pick-hash", "none"], default="generalise",
                        help="F1 from bench/generalise.py's folds (their models cached in bench/.cache), or from bench/pick_hash.py "
                             "(the bundled model on every dev micrograph; its hash shows whether the picks are the same), or none (time only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    commit = _short(args.commit)
    this = _short(args.this) if args.this else None
    with tempfile.TemporaryDirectory() as tmp:
        old = _worktree(Path(tmp) / "old", commit)
        new = _worktree(Path(tmp) / "new", this) if this else ROOT
        try:
            times: dict[str, dict[str, list[float]]] = {"earlier": {}, "this": {}}
            for round_ in range(args.rounds):
                for label, tree in (("earlier", old), ("this", new)):
                    for key, ms in pick_totals(tree, args.count).items():
                        times[label].setdefault(key, []).append(ms)
                log.info("round %d of %d timed", round_ + 1, args.rounds)
            score = {"generalise": fold_f1, "pick-hash": hash_f1, "none": lambda *_: {}}[args.quality]
            f1 = {"earlier": score(old, Path(tmp) / "old.json", args.data), "this": score(new, Path(tmp) / "new.json", args.data)}
        finally:
            for tree in (old, new):
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False, capture_output=True)
    timing = {key: {"earlier_ms": statistics.median(times["earlier"][key]), "this_ms": statistics.median(ms)} for key, ms in times["this"].items()}
    for row in timing.values():
        row["ratio"] = row["this_ms"] / row["earlier_ms"]
    if args.quality == "pick-hash":  # the hash is part of the key: pair the rows by dataset
        earlier = {key.split(" | ")[0]: (key, value) for key, value in f1["earlier"].items()}
        quality = {f"{key} (earlier {earlier[key.split(' | ')[0]][0][-12:]})": {"earlier": earlier[key.split(" | ")[0]][1], "this": value}
                   for key, value in f1["this"].items()}
    else:
        quality = {key: {"earlier": f1["earlier"].get(key), "this": value} for key, value in f1["this"].items()}
    print(f"{'bench/pick.py total':<24} {'earlier ms':>11} {'this ms':>9} {'ratio':>6}")
    for key, row in timing.items():
        print(f"{key:<24} {row['earlier_ms']:11.1f} {row['this_ms']:9.1f} {row['ratio']:6.3f}")
    print(f"\n{'bench/' + ('generalise' if args.quality == 'generalise' else 'pick_hash') + '.py F1':<52} {'earlier':>8} {'this':>8}")
    for key, row in quality.items():
        print(f"{key:<52} {row['earlier'] if row['earlier'] is None else format(row['earlier'], '.4f'):>8} {row['this']:8.4f}")
    worst_f1 = max((abs(r["this"] - r["earlier"]) for r in quality.values() if r["earlier"] is not None), default=0.0)
    worst_time = max(abs(r["ratio"] - 1) for r in timing.values())
    print(f"\nlargest F1 difference {worst_f1:.4f}; largest time difference {worst_time:.1%} (medians of {args.rounds} rounds)")
    out = HERE / "results" / f"compare-{commit}-{this or 'tree'}.json"
    out.write_text(json.dumps({"earlier": commit, "this": this or "working tree", "rounds": args.rounds, "micrographs": args.count, "cores": os.cpu_count(),
                               "pick_total": timing, "quality": args.quality, "f1": quality, "largest_f1_difference": worst_f1,
                               "largest_time_difference": worst_time}, indent=1) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
