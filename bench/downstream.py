"""The quality users see: RELION 2D classification of the picks of emmae-pick, of the LoG baseline and of the labels.

    python bench/downstream.py [--data ../shared/data/real] [--particles 500] [--seeds 0 1 2]
                               [--particles-per-class 100] [--iterations 15] [--j 2] [--keep DIR]

Needs RELION 3.1 (``relion_preprocess``, ``relion_refine``) on the PATH. For each real
dataset's test split (every micrograph, or the first ``--max-micrographs`` by name; the
same for every method), a RELION project is built in a temporary folder: the
micrographs symlinked into ``Micrographs/`` (unsigned 16-bit ones, MRC mode 6, which
RELION 3.1 reads as signed and wraps, as float32 copies in that temporary folder), a
micrographs STAR with an optics block (the header's pixel size; 1 A nominal where the
header has none, so that dataset's resolutions are in nominal units), and three sets
of coordinate files:

* ``emmae-pick``: the command as shipped on the micrographs STAR (bundled model,
  default threshold, the split's median particle diameter in pixels);
* ``LoG``: ``bench/quality.py``'s diameter-matched LoG baseline (Otsu cut);
* ``labels``: the expert centres.

Each set is extracted with ``relion_preprocess`` (box 1.5 diameters, rescaled to 64 px
when larger, normalised, contrast inverted: the particles are dark in all three
datasets). Every method of a dataset is then classified on the same number of
particles: a class's estimated resolution grows with the particles in it, so shares
of sets of different sizes would compare their sizes as much as their content. That
number is the fewest any method kept, at most ``--particles``; a method that kept fewer
than ``--min-particles`` is reported as too few and not classified (it caps no other
method, and a share of ours that is missing fails the bar); each seed of
``--seeds`` draws its own random subset of that size from every method's particles
and runs ``relion_refine`` in 2D without CTF with that seed (classes: one per
``--particles-per-class`` particles, 5 to 20, unless ``--classes`` is given; the same
classes, iterations and masks for the three methods of a dataset). Reported per
method and seed: particles classified, the class-distribution-weighted estimated
resolution, the best class's resolution and the share of particles in "good classes"
(estimated resolution within ``--good-factor`` of the best class's), from the last
iteration's ``model.star`` (the distribution) and ``data.star`` (particles per class,
hard assignment); per method, their mean, least and most over the seeds. The bar is
read on the means over the seeds, and per seed. A second reading, beside the bar's,
holds the three methods of a dataset and seed to one threshold: ``--good-factor``
times the best class's resolution of any of them (the bar's own-best threshold is
stricter for the method whose best class resolves furthest). ``--rescore JSON``
reads a written JSON's figures again without running RELION. Resolutions stand beside
the boxes' Nyquist limit (two rescaled pixels): a best class at it is saturated, and a
dataset where every classified method's best class is saturated in every seed is
flagged: its shares do not discriminate. emmae-pick's own session classes (its
``emmae-classes.png``, kept and dropped) are copied beside the montages as
``<dataset>_emmae-pick_session-classes.png`` and listed in the JSON's ``runs``.

Writes ``bench/results/downstream.json`` (settings, the RELION command lines, figures
per dataset, method and seed, wall time) and one PNG montage of the first seed's class
averages per dataset and method, ``bench/results/downstream/<dataset>_<method>.png``
(classes by decreasing distribution, each labelled with its share and resolution;
good classes framed in green).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
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

from emmae.io.mrc import read_layout, read_micrograph, write_micrograph  # noqa: E402
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


def nyquist_A(setup: Setup) -> float:
    """The finest resolution the classified boxes can show: two of their (rescaled) pixels."""
    return 2 * setup.pixel_A * setup.box_px / setup.scaled_px


def even_ceil(value: float) -> int:
    return int(np.ceil(value / 2.0)) * 2


def setup_for(dataset: str, items: list, args) -> Setup:
    diameter = float(np.median([config.preprocess.diameter_px for _, _, config in items]))
    header = read_micrograph(items[0][0]).pixel_size_A  # the geometric mean of x and y; None when unknown
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
    if read_layout(source).mode == 6:
        micrograph = read_micrograph(source)  # float32
        write_micrograph(target, micrograph.data, micrograph.pixel_size_xy_A)
    else:
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


def keep_session_classes(picked: Path, montage_path: Path) -> dict | None:
    """The classes emmae-pick kept and dropped (its ``emmae-session.json``); its ``emmae-classes.png`` copied to ``montage_path``."""
    try:
        classes = json.loads((picked / "emmae-session.json").read_text())["summary"].get("classes")
    except (OSError, ValueError, KeyError):
        return None
    if (picked / "emmae-classes.png").is_file():
        montage_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picked / "emmae-classes.png", montage_path)
    return classes


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


def classes_for(particles: int, args) -> int:
    """``--classes``, or one class per ``--particles-per-class`` particles, 5 to 20."""
    return args.classes or int(np.clip(particles // args.particles_per_class, 5, 20))


def classify_command(subset: Path, output: str, setup: Setup, classes: int, seed: int, args) -> list[str]:
    return ["relion_refine", "--i", str(subset), "--o", output, "--K", str(classes),
            "--iter", str(args.iterations), "--tau2_fudge", "2", "--particle_diameter", f"{setup.mask_diameter_A:g}", "--zero_mask",
            "--flatten_solvent", "--oversampling", "1", "--psi_step", "12", "--offset_range", "5", "--offset_step", "2", "--norm",
            "--scale", "--j", str(args.j), "--random_seed", str(seed), "--pool", "30", "--dont_combine_weights_via_disc"]


def particles_of(star: Path) -> pd.DataFrame:
    return starfile.read(star, always_dict=True)["particles"]


def write_subset(particles_star: Path, size: int, seed: int, target: Path) -> Path:
    """``size`` particles of ``particles_star`` drawn at random with ``seed`` (file order kept), as a particles STAR."""
    blocks = starfile.read(particles_star, always_dict=True)
    rows = blocks["particles"]
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=size, replace=False))
    blocks["particles"] = rows.iloc[chosen].reset_index(drop=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, target, overwrite=True)
    return target


def summarise(stem: str, setup: Setup, good_factor: float) -> tuple[dict, np.ndarray]:
    """Figures of the last iteration (``stem`` = ``.../run_itNNN``): per class distribution, resolution and particles; the averages.

    A class with no resolution (RELION's ``inf``: no shell above its threshold) counts at the box's
    lowest shell, the box size in Angstrom.
    """
    classes = starfile.read(f"{stem}_model.star", always_dict=True)["model_classes"]
    share = classes["rlnClassDistribution"].to_numpy(np.float64)
    unresolved = ~np.isfinite(classes["rlnEstimatedResolution"].to_numpy(np.float64))
    resolution = np.where(unresolved, setup.box_px * setup.pixel_A, classes["rlnEstimatedResolution"].to_numpy(np.float64))
    assigned = particles_of(Path(f"{stem}_data.star"))["rlnClassNumber"].to_numpy(int)
    members = np.bincount(assigned - 1, minlength=len(share))
    used = share > 0
    best = float(resolution[used].min())
    good = used & (resolution <= good_factor * best)
    with mrcfile.open(f"{stem}_classes.mrcs", permissive=True) as mrc:
        averages = np.asarray(mrc.data, dtype=np.float32).reshape(len(share), *mrc.data.shape[-2:])
    figures = {
        "weighted_resolution_A": float(np.sum(share[used] * resolution[used]) / np.sum(share[used])),
        "best_resolution_A": best,
        "nyquist_A": round(nyquist_A(setup), 3),
        "best_at_nyquist": bool(best <= 1.02 * nyquist_A(setup)),  # saturated: the box's sampling, not the particles, sets it
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


def extract(project: Path, method: str, coords: Path, setup: Setup) -> tuple[int, str, float]:
    """Extract one method's picks: particles kept, the command, seconds."""
    start = time.perf_counter()
    command = extract_command(method, coords, project, setup)
    run_logged(command, project, project / "Extract" / method / "log.txt")
    kept = len(particles_of(project / "Extract" / method / "particles.star"))
    return kept, shlex.join(command), round(time.perf_counter() - start, 1)


def classify(project: Path, method: str, setup: Setup, size: int, classes: int, seed: int, args) -> tuple[dict, np.ndarray]:
    """``size`` of one method's particles drawn with ``seed``, classified in 2D with ``seed``: the figures and averages."""
    start = time.perf_counter()
    subset = write_subset(project / "Extract" / method / "particles.star", size, seed, project / "Extract" / method / f"subset_seed{seed}.star")
    output = f"Class2D/{method}/seed{seed}"
    command = classify_command(subset.relative_to(project), f"{output}/run", setup, classes, seed, args)
    run_logged(command, project, project / output / "log.txt")
    figures, averages = summarise(str(project / output / f"run_it{args.iterations:03d}"), setup, args.good_factor)
    log.info("%s %s seed %d: %d particles, weighted %.1f A, best %.1f A, good share %.3f (%.0f s)", setup.dataset, method, seed, size,
             figures["weighted_resolution_A"], figures["best_resolution_A"], figures["good_share"], time.perf_counter() - start)
    return {"seed": seed, **figures, "classify_s": round(time.perf_counter() - start, 1), "command": shlex.join(command)}, averages


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def run_dataset(folder: Path, root: Path, args) -> tuple[Setup, list[dict], dict]:
    items = split_items(folder, args.split)[: args.max_micrographs]
    setup = setup_for(folder.name, items, args)
    log.info("%s: %s", folder.name, setup)
    project = root / folder.name
    build_project(project, items, setup)
    start = time.perf_counter()
    picked, pick_command = pick_emmae(project, setup, args)
    pick_s = time.perf_counter() - start
    session_classes = keep_session_classes(picked, args.montages / f"{setup.dataset}_emmae-pick_session-classes.png")
    raw = [read_micrograph(path).data for path, _, _ in items]
    coords = {
        "emmae-pick": picked,
        "LoG": write_coordinates(project / "Picks" / "LoG", items, [log_picks(image, config.preprocess.diameter_px) for image, (_, _, config) in zip(raw, items)]),
        "labels": write_coordinates(project / "Picks" / "labels", items, [truth for _, truth, _ in items]),
    }
    extracted = {method: extract(project, method, coords[method], setup) for method in METHODS}
    enough = [kept for kept, _, _ in extracted.values() if kept >= args.min_particles]  # too few: reported, not a cap on the others
    size = min(args.particles, *enough) if enough else 0
    classes = classes_for(size, args)
    log.info("%s: %d particles of every method in %d classes, seeds %s", folder.name, size, classes, args.seeds)
    rows = []
    for method in METHODS:
        kept, extract_line, extract_s = extracted[method]
        if kept < args.min_particles or not size:
            log.warning("%s %s: %d particles, fewer than --min-particles %d: not classified", setup.dataset, method, kept, args.min_particles)
            rows.append({"dataset": setup.dataset, "method": method, "picks": count_coordinates(coords[method], items), "particles_kept": kept,
                         "too_few_particles": True, "particles_classified": 0, "seeds": []})
            continue
        seeds = []
        for seed in args.seeds:
            figures, averages = classify(project, method, setup, size, classes, seed, args)
            seeds.append(figures)
            if seed == args.seeds[0]:
                path = args.montages / f"{setup.dataset}_{method}.png"
                montage(averages, figures["classes"], f"{setup.dataset} {method}: {size} of {kept} particles, {classes} classes, seed {seed}, "
                        f"weighted {figures['weighted_resolution_A']:.1f} A, good {figures['good_share']:.1%}", path)
        rows.append({"dataset": setup.dataset, "method": method, "picks": count_coordinates(coords[method], items), "particles_kept": kept,
                     "particles_classified": size, "classes": classes,
                     "good_share": spread([s["good_share"] for s in seeds]),
                     "weighted_resolution_A": spread([s["weighted_resolution_A"] for s in seeds]),
                     "best_resolution_A": spread([s["best_resolution_A"] for s in seeds]), "nyquist_A": round(nyquist_A(setup), 3),
                     "saturated": all(s["best_at_nyquist"] for s in seeds),
                     "montage": str(path.relative_to(RESULTS.parent.parent)) if path.is_relative_to(RESULTS.parent.parent) else str(path),
                     "extract_s": extract_s, "extract_command": extract_line, "seeds": seeds})
    return setup, rows, {"pick": shlex.join(pick_command), "pick_s": round(pick_s, 1), "session_classes": session_classes,
                         "micrographs": [path.name for path, _, _ in items],
                         "particles_classified": size, "classes": classes}


def meets(ours: float | None, other: float | None, truth: float | None) -> bool:
    """The bar: at least LoG's share minus 0.02 and at least the labels' minus 0.05 (a share above the labels' is no failure).

    None: a method with too few particles to classify; ours too few is no pass, another's sets no bar.
    """
    return bool(ours is not None and (other is None or ours >= other - 0.02) and (truth is None or ours >= truth - 0.05))


def share_within(classes: list[dict], limit_A: float) -> float:
    """Share of the particles (class distribution) in the used classes resolved to ``limit_A`` or finer."""
    used = [c for c in classes if c["distribution"] > 0]
    return sum(c["distribution"] for c in used if c["resolution_A"] <= limit_A) / sum(c["distribution"] for c in used)


def common_reference(rows: list[dict], good_factor: float) -> None:
    """Add to each row the good share against one reference per dataset and seed, the best class of any method.

    A second reading, beside the bar's: a run's own best class sets its threshold there,
    so a method whose best class resolves one shell further is held to a stricter one.
    """
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        found = [row for row in rows if row["dataset"] == dataset and row["seeds"]]
        for k in range(len(found[0]["seeds"]) if found else 0):
            reference = min(row["seeds"][k]["best_resolution_A"] for row in found)
            for row in found:
                row["seeds"][k]["good_share_common_reference"] = share_within(row["seeds"][k]["classes"], good_factor * reference)
        for row in found:
            row["good_share_common_reference"] = spread([s["good_share_common_reference"] for s in row["seeds"]])


def bar(rows: list[dict], seeds: int, key: str = "good_share") -> dict:
    """Per dataset: the bar on the mean shares (``key``) over the seeds, and seed by seed."""
    out = {}
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        found = {row["method"]: row for row in rows if row["dataset"] == dataset}
        mean = {method: found[method][key]["mean"] if found[method]["seeds"] else None for method in METHODS}
        per_seed = [meets(*(found[method]["seeds"][k][key] if found[method]["seeds"] else None for method in METHODS)) for k in range(seeds)]
        difference = {other: None if mean["emmae-pick"] is None or mean[other] is None else round(mean["emmae-pick"] - mean[other], 4)
                      for other in ("LoG", "labels")}
        classified = [row for row in found.values() if row["seeds"]]
        out[dataset] = {"emmae_minus_log": difference["LoG"], "emmae_minus_labels": difference["labels"],
                        "within_0.05_of_labels": difference["labels"] is not None and abs(difference["labels"]) <= 0.05,
                        "met": meets(mean["emmae-pick"], mean["LoG"], mean["labels"]), "met_per_seed": per_seed,
                        "too_few_particles": [m for m in METHODS if not found[m]["seeds"]],
                        "saturated": bool(classified) and all(row.get("saturated", False) for row in classified)}
    return out


def print_table(rows: list[dict], verdict: dict, common: dict) -> None:
    print(f"{'dataset':<14} {'method':<11} {'picks':>6} {'kept':>6} {'classified':>10} {'weighted res (A)':>22} {'good share':>22} {'common reference':>22}")
    for row in rows:
        if not row["seeds"]:
            print(f"{row['dataset']:<14} {row['method']:<11} {row['picks']:6d} {row['particles_kept']:6d}  too few particles to classify")
            continue
        res, share, same = row["weighted_resolution_A"], row["good_share"], row["good_share_common_reference"]
        print(f"{row['dataset']:<14} {row['method']:<11} {row['picks']:6d} {row['particles_kept']:6d} {row['particles_classified']:10d} "
              f"{res['mean']:8.1f} [{res['min']:5.1f}, {res['max']:5.1f}] {share['mean']:8.3f} [{share['min']:.2f}, {share['max']:.2f}] "
              f"{same['mean']:8.3f} [{same['min']:.2f}, {same['max']:.2f}]")
    for reading, checks in (("bar", verdict), ("common reference", common)):
        for dataset, check in checks.items():
            print(f"{reading}, {dataset}: emmae-pick - LoG {check['emmae_minus_log']}, emmae-pick - labels {check['emmae_minus_labels']}: "
                  f"{'met' if check['met'] else 'NOT met'} on the means; seed by seed {sum(check['met_per_seed'])} of {len(check['met_per_seed'])}"
                  + (f"; too few particles: {', '.join(check['too_few_particles'])}" if check.get("too_few_particles") else "")
                  + ("; SATURATED: every method's best class at Nyquist, the shares do not discriminate" if check.get("saturated") else ""))


def record_of(rows: list[dict], seeds: int, good_factor: float) -> dict:
    """The bar and the common-reference reading of ``rows`` (which gain their common-reference shares)."""
    common_reference(rows, good_factor)
    verdict, common = bar(rows, seeds), bar(rows, seeds, "good_share_common_reference")
    print_table(rows, verdict, common)
    return {"bar": verdict, "bar_met": all(check["met"] for check in verdict.values()),
            "bar_met_every_seed": all(all(check["met_per_seed"]) for check in verdict.values()), "common_reference": common}


def rescore(path: Path) -> int:
    """Read a written JSON's figures again (the bar and the common-reference reading) and rewrite it; no RELION run."""
    record = json.loads(path.read_text())
    record.update(record_of(record["results"], len(record["settings"]["seeds"]), record["settings"]["good_factor"]))
    path.write_text(json.dumps(record, indent=1) + "\n")
    log.info("rewrote %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", help="dataset folder names (default: every folder with a manifest.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-micrographs", type=int, help="micrographs per dataset, the first by name, the same for every method (default: all of the split)")
    parser.add_argument("--particles", type=int, default=500, help="particles classified per method and seed: the fewest any method of the dataset kept, "
                        "at most this (default 500: three seeds keep the run within 20 minutes on 2 cores)")
    parser.add_argument("--min-particles", type=int, default=100, help="a method that keeps fewer is reported as too few, not classified, "
                        "and sets no cap on the others (default 100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one subset and relion_refine --random_seed each (default 0 1 2)")
    parser.add_argument("--box-diameters", type=float, default=1.5, help="extraction box in particle diameters (default 1.5)")
    parser.add_argument("--binned-box", type=int, default=64, help="boxes larger than this are rescaled to it (default 64)")
    parser.add_argument("--mask-diameters", type=float, default=1.1, help="relion_refine --particle_diameter in particle diameters (default 1.1)")
    parser.add_argument("--classes", type=int, help="2D classes (default: one per --particles-per-class particles, 5 to 20)")
    parser.add_argument("--particles-per-class", type=int, default=100, help="particles per class when --classes is not given (default 100)")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--j", type=int, default=2, help="threads of emmae-pick and relion_refine (default 2)")
    parser.add_argument("--good-factor", type=float, default=1.5, help="good classes: resolution within this factor of the best (default 1.5)")
    parser.add_argument("--keep", type=Path, help="build the RELION projects here and keep them (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=RESULTS / "downstream.json")
    parser.add_argument("--montages", type=Path, default=RESULTS / "downstream")
    parser.add_argument("--rescore", type=Path, metavar="JSON", help="only read this written JSON's figures again (bar, common reference) and rewrite it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rescore:
        return rescore(args.rescore)
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
    readings = record_of(rows, len(args.seeds), args.good_factor)
    print(f"wall time {wall:.0f} s on {os.cpu_count()} cores")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if key not in ("output", "montages", "keep", "data", "rescore")}
    record = {"split": args.split, "settings": settings, "datasets": setups, "runs": runs, "results": rows, **readings,
              "wall_s": round(wall, 1), "cores": os.cpu_count()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s and %d montages in %s", args.output, len(rows), args.montages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
