"""The quality users see: RELION 2D classification of the picks of emmae-pick, of the LoG baseline and of the labels.

    python bench/downstream.py [--data ../shared/data/real] [--classes 10] [--iterations 15] [--j 2]
                               [--max-micrographs 3] [--keep DIR]

Needs RELION 3.1 (``relion_preprocess``, ``relion_refine``) on the PATH. For each real
dataset's test split (the first ``--max-micrographs`` micrographs by name, the same for
every method: three keep the run within 20 minutes on 2 cores), a RELION project is
built in a temporary folder: the micrographs symlinked into ``Micrographs/`` (unsigned
16-bit ones, MRC mode 6, which RELION 3.1 reads as signed and wraps, as float32 copies
in that temporary folder), a micrographs STAR with an optics block (the header's pixel
size; 1 A nominal where the header has none, so that dataset's resolutions are in
nominal units), and three sets of coordinate files:

* ``emmae-pick``: the command as shipped on the micrographs STAR (bundled model,
  default threshold, the split's median particle diameter in pixels);
* ``LoG``: ``bench/quality.py``'s diameter-matched LoG baseline (Otsu cut);
* ``labels``: the expert centres.

Each set is extracted with ``relion_preprocess`` (box 1.5 diameters, rescaled to 64 px
when larger, normalised, contrast inverted: the particles are dark in all three
datasets) and classified with ``relion_refine`` in 2D without CTF (same classes,
iterations, masks and seed for the three methods of a dataset). Reported per method:
picks, particles kept (extracted), the class-distribution-weighted estimated
resolution, the best class's resolution, and the share of particles in "good
classes" (estimated resolution within ``--good-factor`` of the best class's), from
the last iteration's ``model.star`` (the distribution) and ``data.star`` (particles
per class, hard assignment).

Writes ``bench/results/downstream.json`` (settings, the RELION command lines, figures
per dataset and method, wall time) and one PNG montage of the class averages per
dataset and method, ``bench/results/downstream/<dataset>_<method>.png`` (classes by
decreasing distribution, each labelled with its share and resolution; good classes
framed in green).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import mrcfile
import numpy as np
import pandas as pd
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULT_DATA, log_picks, split_items  # noqa: E402

from emmae.io.mrc import read_micrograph  # noqa: E402
from emmae.io.picks import write_relion_coordinates  # noqa: E402

log = logging.getLogger("bench.downstream")
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("emmae-pick", "LoG", "labels")
SUFFIX = "_autopick.star"
NOMINAL_PIXEL_A = 1.0  # for micrographs whose header has no pixel size


@dataclass(frozen=True)
class Setup:
    """One dataset's extraction and classification settings (the same for every method)."""

    dataset: str
    micrographs: int
    diameter_px: float
    pixel_A: float
    pixel_nominal: bool
    box_px: int
    scaled_px: int
    bg_radius_px: int
    mask_diameter_A: float


def even_ceil(value: float) -> int:
    return int(np.ceil(value / 2.0)) * 2


def pixel_size(path: Path) -> float:
    """The header's pixel size (A), the geometric mean of x and y when they differ; 0 when unknown."""
    with mrcfile.open(path, permissive=True, header_only=True) as mrc:
        x, y = float(mrc.voxel_size.x), float(mrc.voxel_size.y)
    return float(np.sqrt(x * y)) if x > 0 and y > 0 else 0.0


def setup_for(dataset: str, items: list, args) -> Setup:
    diameter = float(np.median([config.preprocess.diameter_px for _, _, config in items]))
    header = pixel_size(items[0][0])
    pixel = header or NOMINAL_PIXEL_A
    box = even_ceil(args.box_diameters * diameter)
    scaled = min(box, args.binned_box)
    mask = args.mask_diameters * diameter * pixel
    return Setup(dataset, len(items), diameter, round(pixel, 4), not header, box, scaled, round(0.75 * scaled / 2), round(mask, 1))


def run_logged(command: list[str], cwd: Path, logfile: Path) -> None:
    """Run ``command`` in ``cwd``, its output in ``logfile``; raise with the log's tail when it fails."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as out:
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}) in {cwd}:\n{tail}")


def link_or_convert(source: Path, target: Path) -> None:
    """A symlink to ``source``; a float32 copy when it is unsigned 16-bit (MRC mode 6), which RELION 3.1 reads as signed."""
    with mrcfile.open(source, permissive=True) as mrc:
        unsigned = int(mrc.header.mode) == 6
        if unsigned:
            with mrcfile.new(target) as out:
                out.set_data(np.asarray(mrc.data, dtype=np.float32))
                out.voxel_size = mrc.voxel_size
    if not unsigned:
        target.symlink_to(source.resolve())


def build_project(project: Path, items: list, setup: Setup) -> Path:
    """Micrographs symlinked into ``project/Micrographs`` and their RELION 3.1 micrographs STAR."""
    (project / "Micrographs").mkdir(parents=True)
    names = []
    for path, _, _ in items:
        link_or_convert(path, project / "Micrographs" / path.name)
        names.append(f"Micrographs/{path.name}")
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographPixelSize": [setup.pixel_A],
                           "rlnMicrographOriginalPixelSize": [setup.pixel_A], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1]})
    micrographs = pd.DataFrame({"rlnMicrographName": names, "rlnOpticsGroup": 1})
    star = project / "micrographs.star"
    starfile.write({"optics": optics, "micrographs": micrographs}, star, overwrite=True)
    return star


def pick_emmae(project: Path, setup: Setup, args) -> tuple[Path, list[str]]:
    """``emmae-pick`` on the micrographs STAR: ``<coords>/Micrographs/<stem>_autopick.star``."""
    command = [str(Path(sys.executable).parent / "emmae-pick"), "micrographs.star", "--diameter-px", f"{setup.diameter_px:g}",
               "-o", "Picks/emmae-pick", "-j", str(args.j), "--device", "cpu"]
    run_logged(command, project, project / "Picks" / "emmae-pick.log")
    return project / "Picks" / "emmae-pick", command


def write_coordinates(folder: Path, items: list, centres: list[np.ndarray]) -> Path:
    (folder / "Micrographs").mkdir(parents=True)
    for (path, _, _), xy in zip(items, centres):
        write_relion_coordinates(folder / "Micrographs" / f"{path.stem}{SUFFIX}", xy, np.ones(len(xy)))
    return folder


def count_coordinates(folder: Path, items: list) -> int:
    total = 0
    for path, _, _ in items:
        file = folder / "Micrographs" / f"{path.stem}{SUFFIX}"
        if file.is_file():
            total += len(next(iter(starfile.read(file, always_dict=True).values()), []))
    return total


def extract_command(method: str, coords: Path, project: Path, setup: Setup) -> list[str]:
    command = ["relion_preprocess", "--i", "micrographs.star", "--coord_dir", f"{coords.relative_to(project)}/", "--coord_suffix", SUFFIX,
               "--part_star", f"Extract/{method}/particles.star", "--part_dir", f"Extract/{method}/", "--extract",
               "--extract_size", str(setup.box_px), "--norm", "--bg_radius", str(setup.bg_radius_px), "--invert_contrast"]
    if setup.scaled_px != setup.box_px:
        command[command.index("--norm"):command.index("--norm")] = ["--scale", str(setup.scaled_px)]
    return command


def classify_command(method: str, setup: Setup, args) -> list[str]:
    return ["relion_refine", "--i", f"Extract/{method}/particles.star", "--o", f"Class2D/{method}/run", "--K", str(args.classes),
            "--iter", str(args.iterations), "--tau2_fudge", "2", "--particle_diameter", f"{setup.mask_diameter_A:g}", "--zero_mask",
            "--flatten_solvent", "--oversampling", "1", "--psi_step", "12", "--offset_range", "5", "--offset_step", "2", "--norm",
            "--scale", "--j", str(args.j), "--random_seed", str(args.seed), "--pool", "30", "--dont_combine_weights_via_disc"]


def particles_of(star: Path) -> pd.DataFrame:
    return starfile.read(star, always_dict=True)["particles"]


def summarise(project: Path, method: str, setup: Setup, args) -> tuple[dict, np.ndarray]:
    """Figures of the last iteration: per class distribution, resolution and particles; the class averages.

    A class with no resolution (RELION's ``inf``: no shell above its threshold) counts at the box's
    lowest shell, the box size in Angstrom.
    """
    stem = project / "Class2D" / method / f"run_it{args.iterations:03d}"
    classes = starfile.read(f"{stem}_model.star", always_dict=True)["model_classes"]
    share = classes["rlnClassDistribution"].to_numpy(np.float64)
    unresolved = ~np.isfinite(classes["rlnEstimatedResolution"].to_numpy(np.float64))
    resolution = np.where(unresolved, setup.box_px * setup.pixel_A, classes["rlnEstimatedResolution"].to_numpy(np.float64))
    assigned = particles_of(Path(f"{stem}_data.star"))["rlnClassNumber"].to_numpy(int)
    members = np.bincount(assigned - 1, minlength=len(share))
    used = share > 0
    best = float(resolution[used].min())
    good = used & (resolution <= args.good_factor * best)
    with mrcfile.open(f"{stem}_classes.mrcs", permissive=True) as mrc:
        averages = np.asarray(mrc.data, dtype=np.float32).reshape(len(share), *mrc.data.shape[-2:])
    figures = {
        "weighted_resolution_A": float(np.sum(share[used] * resolution[used]) / np.sum(share[used])),
        "best_resolution_A": best,
        "good_share": float(share[good].sum() / share[used].sum()),
        "good_classes": int(good.sum()),
        "unresolved_classes": int(unresolved.sum()),
        "particles_in_good_classes": int(members[good].sum()),
        "classes": [{"class": i + 1, "distribution": round(float(s), 5), "resolution_A": round(float(r), 3), "particles": int(m), "good": bool(g),
                     "resolved": not bool(u)} for i, (s, r, m, g, u) in enumerate(zip(share, resolution, members, good, unresolved))],
    }
    return figures, averages


def montage(averages: np.ndarray, classes: list[dict], title: str, path: Path, tile: int = 128, columns: int = 5) -> None:
    """Class averages by decreasing distribution, each labelled with its share and resolution; good ones framed green."""
    order = sorted(range(len(classes)), key=lambda i: -classes[i]["distribution"])
    rows, label, head = -(-len(order) // columns), 18, 24
    sheet = np.full((head + rows * (tile + label), columns * tile, 3), 255, np.uint8)
    cv2.putText(sheet, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for k, i in enumerate(order):
        image = averages[i]
        low, high = np.percentile(image, [1, 99])
        grey = np.clip((image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
        grey = cv2.resize(grey, (tile, tile), interpolation=cv2.INTER_LINEAR)
        y, x = head + (k // columns) * (tile + label), (k % columns) * tile
        sheet[y:y + tile, x:x + tile] = grey[..., None]
        if classes[i]["good"]:
            cv2.rectangle(sheet, (x, y), (x + tile - 1, y + tile - 1), (0, 170, 0), 2)
        text = f"{classes[i]['distribution']:.1%}  {classes[i]['resolution_A']:.0f} A"
        cv2.putText(sheet, text, (x + 4, y + tile + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)


def run_method(project: Path, method: str, coords: Path, items: list, setup: Setup, args) -> dict:
    """Extract and classify one method's picks; its figures and montage."""
    start = time.perf_counter()
    extract = extract_command(method, coords, project, setup)
    run_logged(extract, project, project / "Extract" / method / "log.txt")
    kept = len(particles_of(project / "Extract" / method / "particles.star"))
    extracted = time.perf_counter()
    classify = classify_command(method, setup, args)
    run_logged(classify, project, project / "Class2D" / method / "log.txt")
    figures, averages = summarise(project, method, setup, args)
    montage_path = args.montages / f"{setup.dataset}_{method}.png"
    title = f"{setup.dataset} {method}: {kept} particles, {args.classes} classes, weighted {figures['weighted_resolution_A']:.1f} A, good {figures['good_share']:.1%}"
    montage(averages, figures["classes"], title, montage_path)
    row = {"dataset": setup.dataset, "method": method, "picks": count_coordinates(coords, items), "particles_kept": kept, **figures,
           "montage": str(montage_path.relative_to(RESULTS.parent.parent)) if montage_path.is_relative_to(RESULTS.parent.parent) else str(montage_path),
           "extract_s": round(extracted - start, 1), "classify_s": round(time.perf_counter() - extracted, 1),
           "commands": {"extract": shlex.join(extract), "classify": shlex.join(classify)}}
    log.info("%s %s: %d picks, %d kept, weighted %.1f A, best %.1f A, good share %.3f (%.0f s)", setup.dataset, method, row["picks"], kept,
             figures["weighted_resolution_A"], figures["best_resolution_A"], figures["good_share"], time.perf_counter() - start)
    return row


def run_dataset(folder: Path, root: Path, args) -> tuple[Setup, list[dict], dict]:
    items = split_items(folder, args.split)[: args.max_micrographs]
    setup = setup_for(folder.name, items, args)
    log.info("%s: %s", folder.name, setup)
    project = root / folder.name
    build_project(project, items, setup)
    start = time.perf_counter()
    picked, pick_command = pick_emmae(project, setup, args)
    pick_s = time.perf_counter() - start
    raw = [read_micrograph(path).data for path, _, _ in items]
    coords = {
        "emmae-pick": picked,
        "LoG": write_coordinates(project / "Picks" / "LoG", items, [log_picks(image, config.preprocess.diameter_px) for image, (_, _, config) in zip(raw, items)]),
        "labels": write_coordinates(project / "Picks" / "labels", items, [truth for _, truth, _ in items]),
    }
    rows = [run_method(project, method, coords[method], items, setup, args) for method in METHODS]
    return setup, rows, {"pick": shlex.join(pick_command), "pick_s": round(pick_s, 1), "micrographs": [path.name for path, _, _ in items]}


def bar(rows: list[dict]) -> dict:
    """Per dataset: emmae-pick's good share against LoG's (at least minus 0.02) and the labels' (at least minus 0.05:
    a share above the labels' is no failure)."""
    out = {}
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        share = {row["method"]: row["good_share"] for row in rows if row["dataset"] == dataset}
        ours, other, truth = share["emmae-pick"], share["LoG"], share["labels"]
        out[dataset] = {"emmae_minus_log": round(ours - other, 4), "emmae_minus_labels": round(ours - truth, 4),
                        "met": bool(ours >= other - 0.02 and ours >= truth - 0.05)}
    return out


def print_table(rows: list[dict], verdict: dict) -> None:
    print(f"{'dataset':<14} {'method':<11} {'picks':>6} {'kept':>6} {'weighted res (A)':>16} {'best (A)':>8} {'good share':>10}")
    for row in rows:
        print(f"{row['dataset']:<14} {row['method']:<11} {row['picks']:6d} {row['particles_kept']:6d} {row['weighted_resolution_A']:16.1f} "
              f"{row['best_resolution_A']:8.1f} {row['good_share']:10.3f}")
    for dataset, check in verdict.items():
        print(f"{dataset}: emmae-pick - LoG {check['emmae_minus_log']:+.3f}, emmae-pick - labels {check['emmae_minus_labels']:+.3f}: "
              f"{'met' if check['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", help="dataset folder names (default: every folder with a manifest.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-micrographs", type=int, default=3, help="micrographs per dataset, the first by name, the same for every method: "
                        "the run's budget, 20 minutes on 2 cores (default 3)")
    parser.add_argument("--box-diameters", type=float, default=1.5, help="extraction box in particle diameters (default 1.5)")
    parser.add_argument("--binned-box", type=int, default=64, help="boxes larger than this are rescaled to it (default 64)")
    parser.add_argument("--mask-diameters", type=float, default=1.1, help="relion_refine --particle_diameter in particle diameters (default 1.1)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--j", type=int, default=2, help="threads of emmae-pick and relion_refine (default 2)")
    parser.add_argument("--good-factor", type=float, default=1.5, help="good classes: resolution within this factor of the best (default 1.5)")
    parser.add_argument("--keep", type=Path, help="build the RELION projects here and keep them (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=RESULTS / "downstream.json")
    parser.add_argument("--montages", type=Path, default=RESULTS / "downstream")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data.is_dir():
        log.error("no real data at %s", args.data)
        return 2
    folders = [args.data / name for name in args.datasets] if args.datasets else sorted(m.parent for m in args.data.glob("*/manifest.json"))
    start = time.perf_counter()
    setups, rows, runs = [], [], {}
    with tempfile.TemporaryDirectory(prefix="emmae-downstream-") as tmp:
        root = args.keep or Path(tmp)
        for folder in folders:
            setup, found, run = run_dataset(folder, root, args)
            setups.append(asdict(setup))
            rows += found
            runs[folder.name] = run
    wall = time.perf_counter() - start
    verdict = bar(rows)
    print_table(rows, verdict)
    print(f"wall time {wall:.0f} s on {os.cpu_count()} cores")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key not in ("output", "montages", "keep", "data")}
    record = {"split": args.split, "settings": settings, "datasets": setups, "runs": runs, "results": rows, "bar": verdict,
              "bar_met": all(check["met"] for check in verdict.values()), "wall_s": round(wall, 1), "cores": os.cpu_count()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s and %d montages in %s", args.output, len(rows), args.montages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
