"""Picking data the model never saw: leave-one-dataset-out over the real dev datasets, plus synthetic sessions.

    python bench/generalise.py [--data ../shared/data/real] [--topaz PATH] [--no-synthetic]

For each real dataset D (``../shared/data/real/*``), the fold model never saw D: it
was trained with the bundled default's recipe on the other datasets' train splits
(``bench/generalise_models.py``, cached, trained here when missing), or read from
``--models DIR`` (``DIR/without-D/model.onnx``, e.g. what ``bench/gpu_train_import.py``
wrote). D's test split is then picked, all methods on the same micrographs:

* ``fold model``: the picker as shipped (session-level particle choice, template
  localisation, latent vetting), with the fold model; the session is fitted on the
  split itself (``cluster.session_micrographs`` spread over it), as ``emmae-pick``
  does for a batch;
* ``fold model, latents unused``: the same picker with the latents out of every
  decision (no latent vetting, no cluster weighting): template only;
* ``fold model, reference rule``: the same model with the authors' per-micrograph
  hierarchy and connected components (``cluster.selection=reference``,
  ``postprocess.method=components``);
* ``bundled default``: the shipped model, or ``--default BUNDLE`` (which may have seen D's train split);
* ``LoG (Otsu)``: ``bench/quality.py``'s diameter-matched LoG with an Otsu cut;
* ``LoG (top-N)``: the same peaks, the N strongest kept, N from a 25 % coverage
  prior (the middle of the 5-45 % that real micrographs span): label-free;
* ``Topaz (pretrained)`` with ``--topaz``;
* ``fold model, adapted`` with ``--adapt``: the fold model fine-tuned without labels
  (``emmae-adapt``) on D's *train* split micrographs, then picking D's test split.
  ``--adapt`` also times an adaptation of the bundled default on 20 micrographs
  (EMPIAR-10146's, 1240 x 1200, label-free) on this machine.

One-to-one F1 (the paper's metric) pooled over the split, and a paired bootstrap
over micrographs of the fold model's F1 minus each other method's. For the fold
model with and without latents, a precision-recall sweep of the figure of merit
(thresholds 0.05-0.95, re-cut from the candidates as ``--rethreshold`` does): the
average precision, the picks at 0.9 over those at 0.1, whether precision rises with
the threshold, and the F1 at the default threshold against the best.

Junk sessions (``JUNK_SESSIONS``, bundled model) hold what facility sessions hold
beside the particles, never in the truth: faint particles among dark round
contaminants 0.5-3 diameters wide at 3-10x their contrast, carbon edges and a
carbon-only micrograph, aggregates (clumps of overlapping particles), empty and
crystalline-ice micrographs mixed in, faint particles alone, faint particles among many small dark
specks (a third of the diameter, darker than the particles). Each reports F1 and the
share of picks on junk (within ``JUNK_REACH_DIAMETERS`` of it) for the shipped
picker, the same picker with the latents unused, the reference rule and LoG. The
synthetic sessions vary what real data varies (diameter 16-120 grid px, 5-45 %
coverage with touching particles, carbon edges, contamination).
Writes ``bench/results/generalise.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalise_models import CACHE, DEFAULT_DATA, Fold, ensure_model, folds  # noqa: E402
from quality import bootstrap_difference, log_peaks, log_picks, pooled, split_items, topaz_picks  # noqa: E402

from emmae.config import EmmaeConfig  # noqa: E402
from emmae.io.mrc import read_micrograph  # noqa: E402
from emmae.io.truth import read_centres  # noqa: E402
from emmae.memory import retain_freed_memory  # noqa: E402
from emmae.metrics import score_micrograph  # noqa: E402
from emmae.runtime.picking.bundle import open_bundle  # noqa: E402
from emmae.runtime.picking.encoder import Encoder  # noqa: E402
from emmae.io.picks import Picks  # noqa: E402
from emmae.runtime.picking.picker import Encoded, encode, fit, needs_session, pick, prepare, repick, session_sample_indices  # noqa: E402
from emmae.runtime.picking.postprocess import drop_border, suppress_neighbours  # noqa: E402
from emmae.synth import SynthParams, make_micrograph, write_micrograph_with_truth, write_session  # noqa: E402
from emmae.trainer.data import items_from_manifest  # noqa: E402 - torch-free

log = logging.getLogger("bench.generalise")
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_RULE = {"cluster": {"selection": "reference"}, "postprocess": {"method": "components"}}
TOP_N_COVERAGE = 0.25
# (name, grid diameter px, coverage, carbon edge, contaminants): what real sessions vary.
SYNTHETIC = [
    ("small-crowded", 16.0, 0.30, False, 0),
    ("medium-touching-carbon", 40.0, 0.45, True, 0),
    ("large-sparse-contaminated", 80.0, 0.05, False, 6),
    ("huge-carbon-contaminated", 120.0, 0.25, True, 3),
]
# Junk sessions: what facility sessions hold beside the particles. Each is a list of
# (micrographs, SynthParams fields) mixed into one session; junk is never in the truth.
_FAINT_60 = {"diameter_px": 60.0, "n_particles": 110, "snr": 0.015}
_MEDIUM_40 = {"diameter_px": 40.0, "n_particles": 180, "snr": 0.1}
JUNK_SESSIONS = {
    "dark-contaminants": [(6, {**_FAINT_60, "n_contaminants": 10, "contaminant_contrast": (3.0, 10.0), "contaminant_width_diameters": (0.5, 3.0)})],
    "carbon-edge-and-carbon-only": [(4, {**_MEDIUM_40, "n_particles": 120, "carbon_edge": True}), (1, {**_MEDIUM_40, "n_particles": 0, "carbon_edge": True,
                                                                                                   "carbon_fraction": (1.0, 1.0)}), (1, _MEDIUM_40)],
    "aggregates": [(6, {**_MEDIUM_40, "n_aggregates": 6})],
    "empty-and-crystalline-ice": [(4, _MEDIUM_40), (1, {**_MEDIUM_40, "n_particles": 0}),
                                  (1, {**_MEDIUM_40, "n_particles": 0, "n_contaminants": 14, "contaminant_contrast": (2.0, 4.0)})],
    "faint": [(6, {"diameter_px": 50.0, "n_particles": 150, "snr": 0.02})],
    "dark-specks": [(6, {**_FAINT_60, "n_contaminants": 60, "contaminant_contrast": (1.5, 3.0), "contaminant_width_diameters": (0.3, 0.36)})],
}
LATENTS_UNUSED = {"postprocess": {"latent_gate": 0.0, "latent_vetting": False}}  # the same picker, template only
SWEEP = np.round(np.arange(0.05, 1.0, 0.05), 3)  # figure-of-merit thresholds of the precision-recall sweep
JUNK_REACH_DIAMETERS = 0.25  # a pick this close to junk (or on it) lands on junk


def log_top_n(image: np.ndarray, diameter_px: float, coverage: float = TOP_N_COVERAGE) -> np.ndarray:
    """LoG peaks (``quality.log_peaks``), the N strongest kept: N = coverage x area / particle disk."""
    found = drop_border(suppress_neighbours(log_peaks(image, diameter_px), diameter_px / 2), image.shape, diameter_px / 1.5)
    count = int(round(coverage * image.size / (np.pi * (diameter_px / 2) ** 2)))
    return found.xy[np.argsort(-found.score, kind="stable")[:count]]


def pick_split(encoder: Encoder, items: list[tuple[Path, np.ndarray, EmmaeConfig]], overrides: list[dict]) -> list[list[np.ndarray]]:
    """Picks (input pixels) of every item under each configuration override, the session fitted on the split."""
    return [[result.xy for result in results] for results in pick_split_results(encoder, items, overrides)]


def pick_split_results(encoder: Encoder, items: list[tuple[Path, np.ndarray, EmmaeConfig]], overrides: list[dict]) -> list[list[Picks]]:
    """:func:`pick_split`, with every micrograph's whole :class:`Picks` (its candidates, for re-thresholding)."""
    encoded: list[Encoded] = [encode(prepare(path, config, encoder), encoder) for path, _, config in items]
    out = []
    for override in overrides:
        configs = [EmmaeConfig.model_validate(_merge(config.model_dump(), override)) for _, _, config in items]
        sample = [encoded[i] for i in session_sample_indices(len(encoded), configs[0].cluster.session_micrographs)]
        session = fit(sample, configs[0], encoder) if needs_session(configs[0]) else None
        out.append([pick(e, c, encoder, session) for e, c in zip(encoded, configs)])
    return out


def threshold_sweep(results: list[Picks], items: list[tuple[Path, np.ndarray, EmmaeConfig]]) -> dict:
    """Precision and recall of the picks at every figure-of-merit threshold of ``SWEEP``, and the average precision.

    The picks are re-cut from each micrograph's candidates (``repick``), as
    ``emmae-pick --rethreshold --threshold T`` does. AP: the area under the
    precision-recall steps, recall rising as the threshold falls.
    """
    rows = []
    for threshold in SWEEP:
        scores = [score_micrograph(repick(result, config.model_copy(update={"postprocess": config.postprocess.model_copy(update={"threshold": float(threshold)})})).xy,
                                   truth, config.preprocess.diameter_px) for result, (_, truth, config) in zip(results, items)]
        total = pooled(scores)
        rows.append({"threshold": round(float(threshold), 3), "picks": total.picks, "precision": total.precision, "recall": total.recall, "f1": total.f1})
    ap, recall = 0.0, 0.0
    for row in sorted(rows, key=lambda r: r["recall"]):
        ap += (row["recall"] - recall) * row["precision"]
        recall = row["recall"]
    at = {row["threshold"]: row for row in rows}
    default = EmmaeConfig().postprocess.threshold
    best = max(rows, key=lambda r: r["f1"])
    precisions = [row["precision"] for row in rows if row["picks"]]
    return {"average_precision": ap, "sweep": rows, "picks_0.9_over_0.1": at[0.9]["picks"] / max(1, at[0.1]["picks"]),
            "precision_rises": bool(np.all(np.diff(precisions) >= -0.01)), "default_threshold": default,
            "default_f1": at[round(default, 3)]["f1"], "best_threshold": best["threshold"], "best_f1": best["f1"]}


def _merge(base: dict, override: dict) -> dict:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for section, values in override.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def score_rows(label: str, picks: dict[str, list[np.ndarray]], items, resamples: int, lead: str) -> list[dict]:
    """One row per method: pooled score, and the bootstrap of ``lead`` minus it."""
    scores = {method: [score_micrograph(xy, truth, config.preprocess.diameter_px) for xy, (_, truth, config) in zip(found, items)]
              for method, found in picks.items()}
    rows = []
    for method, per in scores.items():
        row = {"dataset": label, "method": method, **pooled(per).to_dict(), "per_micrograph_f1": [round(s.f1, 4) for s in per]}
        if method != lead:
            row["lead_minus_this"] = bootstrap_difference(scores[lead], per, resamples)
        rows.append(row)
    return rows


def real_fold(data: Path, fold: Fold, default: Encoder, args) -> list[dict]:
    items = split_items(data / fold.held_out, "test")
    model = fold_model(data, fold, args)
    encoder = Encoder.open(model)
    start = time.perf_counter()
    shipped, unused, reference = pick_split_results(encoder, items, [{}, LATENTS_UNUSED, REFERENCE_RULE])
    seconds = (time.perf_counter() - start) / len(items)
    picks = {"fold model": [r.xy for r in shipped], "fold model, latents unused": [r.xy for r in unused],
             "fold model, reference rule": [r.xy for r in reference], "bundled default": pick_split(default, items, [{}])[0]}
    raw = [read_micrograph(path).data for path, _, _ in items]
    picks["LoG (Otsu)"] = [log_picks(image, config.preprocess.diameter_px) for image, (_, _, config) in zip(raw, items)]
    picks["LoG (top-N)"] = [log_top_n(image, config.preprocess.diameter_px) for image, (_, _, config) in zip(raw, items)]
    if args.topaz:
        diameter = float(np.median([config.preprocess.diameter_px for _, _, config in items]))
        found = topaz_picks(args.topaz, [path for path, _, _ in items], diameter)
        picks["Topaz (pretrained)"] = [found.get(path.stem, np.zeros((0, 2))) for path, _, _ in items]
    adapted = None
    if args.adapt:
        unlabelled = items_from_manifest(data / fold.held_out / "manifest.json", "train")  # no labels are read
        adapted = adapt(model, unlabelled, model.parent / f"adapted-e{args.adapt_epochs}", args)
        picks["fold model, adapted"] = pick_split(Encoder.open(adapted["bundle"]), items, [{}])[0]
    rows = score_rows(fold.held_out, picks, items, args.resamples, "fold model")
    sweeps = {"fold model": threshold_sweep(shipped, items), "fold model, latents unused": threshold_sweep(unused, items)}
    for row in rows:
        row["trained_on"] = list(fold.train_on)
        if row["method"] in sweeps:
            row["figure_of_merit"] = sweeps[row["method"]]
        if adapted and row["method"] == "fold model, adapted":
            row["adaptation"] = {k: v for k, v in adapted.items() if k != "bundle"}
    log.info("%s: %d test micrographs, %.2f s per micrograph for both fold-model rules", fold.held_out, len(items), seconds)
    return rows


def fold_model(data: Path, fold: Fold, args) -> Path:
    """The fold's bundle: from ``--models`` when given (never trained here), else the CPU recipe's (cached)."""
    if args.models is None:
        return ensure_model(data, fold, args.micrograph_epochs, args.seed)
    bundle = args.models / fold.name / "model.onnx"
    if not bundle.is_file():
        raise FileNotFoundError(f"--models {args.models}: no {fold.name}/model.onnx")
    return bundle


def adapt(parent: Path, micrographs: list, folder: Path, args) -> dict:
    """``parent`` fine-tuned (emmae-adapt, no labels) on ``micrographs``; cached in ``folder``. Returns the bundle and the timing."""
    bundle, timing = folder / "model.onnx", folder / "timing.json"
    if bundle.is_file() and timing.is_file():
        return {"bundle": bundle, **json.loads(timing.read_text())}
    diameter = float(np.median([m.diameter_px for m in micrographs]))
    command = [sys.executable, "-m", "emmae.adapt", *[str(m.path) for m in micrographs], "--model", str(parent), "--out", str(bundle),
               "--diameter-px", str(diameter), "--epochs", str(args.adapt_epochs), "--budget-s", str(args.adapt_budget_s), "--threads", "2"]
    log.info("adapting %s on %d micrographs", parent, len(micrographs))
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    provenance = open_bundle(bundle).info.provenance
    record = {"seconds": seconds, "micrographs": len(micrographs), "epochs": provenance["epochs"],
              "final_train_loss": provenance["final_train_loss"], "budget_s": args.adapt_budget_s}
    timing.write_text(json.dumps(record) + "\n")
    return {"bundle": bundle, **record}


def synthetic_session(name: str, diameter: float, coverage: float, carbon: bool, contaminants: int, default: Encoder, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        count = int(round(coverage * 1024 * 1024 / (np.pi * (diameter / 2) ** 2)))
        while True:  # as many as fit beside the carbon and contamination (random packing jams near 45 %)
            params = SynthParams(shape=(1024, 1024), diameter_px=diameter, pixel_size_A=1.0, n_particles=count, snr=0.1,
                                 carbon_edge=carbon, n_contaminants=contaminants)
            try:
                paths = write_session(Path(tmp), args.synthetic_micrographs, params, seed=7)
                break
            except ValueError:
                count = int(count * 0.9)
        coverage = count * np.pi * (diameter / 2) ** 2 / 1024**2
        config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}})
        items = [(p, read_centres(p.with_name(f"{p.stem}_truth.star")), config) for p in sorted(paths)]
        picks = {"bundled default": pick_split(default, items, [{}])[0],
                 "bundled default, reference rule": pick_split(default, items, [REFERENCE_RULE])[0]}
        raw = [read_micrograph(path).data for path, _, _ in items]
        picks["LoG (Otsu)"] = [log_picks(image, diameter) for image in raw]
        picks["LoG (top-N)"] = [log_top_n(image, diameter) for image in raw]
        rows = score_rows(f"synthetic {name}", picks, items, args.resamples, "bundled default")
    for row in rows:
        row["synthetic"] = {"diameter_px": diameter, "coverage": coverage, "carbon_edge": carbon, "contaminants": contaminants}
    return rows


def write_junk_session(folder: Path, spec: list[tuple[int, dict]], seed: int = 11) -> list[tuple[Path, np.ndarray, np.ndarray | None, EmmaeConfig]]:
    """The micrographs of one junk session: (path, truth centres, junk mask or None, config), in acquisition order (kinds interleaved)."""
    order = [(kind, i) for kind, (count, _) in enumerate(spec) for i in range(count)]
    order.sort(key=lambda ki: (ki[1], ki[0]))  # the odd micrographs are spread through the session, not last
    items = []
    for n, (kind, i) in enumerate(order):
        fields = spec[kind][1]
        synth = make_micrograph(SynthParams(shape=(1024, 1024), pixel_size_A=1.0, **fields), seed=seed * 1000 + n)
        path, _ = write_micrograph_with_truth(folder, f"mic_{n:03d}", synth)
        config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": fields["diameter_px"]}})
        items.append((path, synth.centres_xy, synth.junk, config))
    return items


def on_junk(picks_xy: np.ndarray, junk: np.ndarray | None, diameter_px: float) -> int:
    """How many picks lie on the junk mask or within ``JUNK_REACH_DIAMETERS`` of it."""
    if junk is None or len(picks_xy) == 0:
        return 0
    distance = ndi.distance_transform_edt(~junk)
    rows = np.clip(np.round(picks_xy[:, 1]).astype(int), 0, junk.shape[0] - 1)
    cols = np.clip(np.round(picks_xy[:, 0]).astype(int), 0, junk.shape[1] - 1)
    return int(np.sum(distance[rows, cols] <= JUNK_REACH_DIAMETERS * diameter_px))


def junk_session(name: str, spec: list[tuple[int, dict]], default: Encoder, args) -> list[dict]:
    """One junk session picked by the shipped picker, the same picker with the latents unused, the reference rule and LoG."""
    with tempfile.TemporaryDirectory() as tmp:
        junk_items = write_junk_session(Path(tmp), spec)
        items = [(path, truth, config) for path, truth, _, config in junk_items]
        shipped, unused, reference = pick_split(default, items, [{}, LATENTS_UNUSED, REFERENCE_RULE])
        picks = {"shipped": shipped, "latents unused": unused, "reference rule": reference}
        raw = [read_micrograph(path).data for path, _, _ in items]
        picks["LoG (top-N)"] = [log_top_n(image, config.preprocess.diameter_px) for image, (_, _, config) in zip(raw, items)]
        rows = score_rows(f"junk {name}", picks, items, args.resamples, "shipped")
    for row in rows:
        found = picks[row["method"]]
        junk = sum(on_junk(xy, mask, config.preprocess.diameter_px) for xy, (_, _, mask, config) in zip(found, junk_items))
        row["picks_on_junk"] = junk
        row["junk_share"] = junk / max(1, row["picks"])
        row["session"] = [{"micrographs": count, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}} for count, fields in spec]
    return rows


def print_table(rows: list[dict], lead_key: str) -> None:
    width = max(len(r["method"]) for r in rows)
    print(f"{'dataset':<34} {'method':<{width}} {'F1':>6} {'prec':>6} {'recall':>6} {'picks':>6} {'truth':>6}  lead - this: F1 [95 %], wins")
    for r in rows:
        gap = r.get(lead_key)
        spread = f"  {gap['f1_difference']:+.3f} [{gap['interval_95'][0]:+.3f}, {gap['interval_95'][1]:+.3f}], {gap['model_wins']:.0%}" if gap else ""
        print(f"{r['dataset']:<34} {r['method']:<{width}} {r['f1']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['picks']:6d} {r['truths']:6d}{spread}")


def bar_summary(rows: list[dict]) -> dict:
    """Fold model against the best label-free baseline (LoG Otsu, LoG top-N) of each fold."""
    per_fold = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = {r["method"]: r["f1"] for r in rows if r["dataset"] == dataset}
        best = max(("LoG (Otsu)", "LoG (top-N)"), key=lambda m: mine[m])
        per_fold[dataset] = {"fold_model": mine["fold model"], "best_baseline": best, "best_baseline_f1": mine[best],
                             "difference": mine["fold model"] - mine[best]}
        if "fold model, adapted" in mine:
            per_fold[dataset] |= {"adapted": mine["fold model, adapted"], "adapted_gain": mine["fold model, adapted"] - mine["fold model"]}
        if "fold model, latents unused" in mine:
            unused = next(r for r in rows if r["dataset"] == dataset and r["method"] == "fold model, latents unused")
            merit = next(r for r in rows if r["dataset"] == dataset and r["method"] == "fold model")["figure_of_merit"]
            per_fold[dataset] |= {"latents_unused": mine["fold model, latents unused"], "latent_gain": unused["lead_minus_this"],
                                  "average_precision": merit["average_precision"], "picks_0.9_over_0.1": merit["picks_0.9_over_0.1"],
                                  "precision_rises": merit["precision_rises"], "default_f1": merit["default_f1"], "best_f1": merit["best_f1"],
                                  "best_threshold": merit["best_threshold"]}
    summary = {"folds": per_fold, "mean_fold_model": float(np.mean([f["fold_model"] for f in per_fold.values()])),
               "mean_best_baseline": float(np.mean([f["best_baseline_f1"] for f in per_fold.values()]))}
    if all("latents_unused" in f for f in per_fold.values()):
        summary["mean_latents_unused"] = float(np.mean([f["latents_unused"] for f in per_fold.values()]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--micrograph-epochs", type=int, default=240, help="fold models' training budget (see generalise_models.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--topaz", type=Path, help="`topaz` script of a venv with topaz-em (see bench/quality.py)")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--synthetic-micrographs", type=int, default=4)
    parser.add_argument("--adapt", action="store_true", help="also adapt each fold model to its held-out dataset (and time 20 micrographs)")
    parser.add_argument("--adapt-epochs", type=int, default=5)
    parser.add_argument("--adapt-budget-s", type=float, default=600.0)
    parser.add_argument("--models", type=Path, help="fold models from DIR/without-<dataset>/model.onnx (bench/gpu_train_import.py)")
    parser.add_argument("--default", type=Path, help="this bundle in the 'bundled default' rows and the junk and synthetic sessions")
    parser.add_argument("--output", type=Path, default=RESULTS / "generalise.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    if not args.data.is_dir():
        log.error("no real data at %s", args.data)
        return 2
    default = Encoder.open(args.default)
    real = [row for fold in folds(args.data) for row in real_fold(args.data, fold, default, args)]
    print_table(real, "lead_minus_this")
    summary = bar_summary(real)
    print(f"mean F1 over folds: fold model {summary['mean_fold_model']:.3f}, latents unused {summary.get('mean_latents_unused', float('nan')):.3f}, "
          f"best label-free baseline {summary['mean_best_baseline']:.3f}")
    for dataset, fold in summary["folds"].items():
        print(f"{dataset}: AP {fold['average_precision']:.3f}; picks at 0.9 / at 0.1 {fold['picks_0.9_over_0.1']:.2f}; precision rises "
              f"{fold['precision_rises']}; F1 at the default threshold {fold['default_f1']:.3f}, best {fold['best_f1']:.3f} at {fold['best_threshold']}")
    record = {"bundle": default.bundle.path.name, "split": "test", "summary": summary, "real": real, "synthetic": [],
              "micrograph_epochs": args.micrograph_epochs, "seed": args.seed, "models": str(args.models) if args.models else None}
    if args.adapt:
        twenty = items_from_manifest(args.data / "EMPIAR-10146" / "manifest.json", "train") + items_from_manifest(args.data / "EMPIAR-10146" / "manifest.json", "valid") \
            + items_from_manifest(args.data / "EMPIAR-10146" / "manifest.json", "test")
        timing = adapt(default.bundle.path, twenty[:20], CACHE / f"adapt-default-{len(twenty[:20])}-e{args.adapt_epochs}", args)
        record["adaptation_timing"] = {k: v for k, v in timing.items() if k != "bundle"} | {"cores": os.cpu_count()}
        print(f"adapting the bundled default on {timing['micrographs']} micrographs: {timing['seconds']:.0f} s ({timing['epochs']} epochs)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")  # the real folds first: the synthetic part comes after
    if not args.no_synthetic:
        record["junk"] = [row for name, spec in JUNK_SESSIONS.items() for row in junk_session(name, spec, default, args)]
        print_table(record["junk"], "lead_minus_this")
        for row in record["junk"]:
            print(f"{row['dataset']:<34} {row['method']:<16} picks on junk {row['picks_on_junk']:5d} ({row['junk_share']:.1%})")
        args.output.write_text(json.dumps(record, indent=1) + "\n")
        record["synthetic"] = [row for spec in SYNTHETIC for row in synthetic_session(*spec, default, args)]
        print_table(record["synthetic"], "lead_minus_this")
        args.output.write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
