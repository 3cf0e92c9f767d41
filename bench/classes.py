"""Session classes against the same picker without them, one run, on the same micrographs.

    python bench/classes.py [--data ../shared/data/real] [--bundle model.onnx] [--split test]

* Real dev datasets (each split picked as one session, as ``emmae-pick`` does): F1 at the
  default threshold, precision and recall at thresholds 0.5 and 0.9 (re-cut from the
  candidates as ``--rethreshold`` does), and which classes the session dropped, why.
* Junk sessions (``generalise.JUNK_SESSIONS``, the dark-speck session among them): F1
  and the share of picks on junk.
* ``../shared/data/junk/UCSF-1142`` (a real micrograph with a contamination mask): picks
  inside the mask for diameters 20-40 px.
* Time: each session's fit and the picking of its micrographs, with and without classes.

"without classes" is ``postprocess.session_classes=0``: the picker as it was before them.
Writes ``bench/results/classes.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalise import JUNK_SESSIONS, _merge, on_junk, write_junk_session  # noqa: E402
from generalise_models import DEFAULT_DATA  # noqa: E402
from quality import pooled, split_items  # noqa: E402

from emmae.config import EmmaeConfig  # noqa: E402
from emmae.io.mrc import read_micrograph  # noqa: E402
from emmae.memory import retain_freed_memory  # noqa: E402
from emmae.metrics import score_micrograph  # noqa: E402
from emmae.runtime.picking.encoder import Encoder  # noqa: E402
from emmae.runtime.picking.picker import encode, fit, pick, prepare, repick, session_sample_indices  # noqa: E402

log = logging.getLogger("bench.classes")
RESULTS = Path(__file__).resolve().parent / "results"
WITHOUT = {"postprocess": {"session_classes": 0}}
VARIANTS = {"without classes": WITHOUT, "with classes": {}}
THRESHOLDS = (0.5, 0.9)
UCSF = DEFAULT_DATA.parent / "junk" / "UCSF-1142"


def session_picks(encoder: Encoder, items: list, override: dict) -> tuple[list, dict, dict]:
    """Every item picked with one session fitted on the split (as emmae-pick does), its session summary and the times."""
    encoded = [encode(prepare(path, config, encoder), encoder) for path, _, config in items]
    configs = [EmmaeConfig.model_validate(_merge(config.model_dump(), override)) for _, _, config in items]
    sample = [encoded[i] for i in session_sample_indices(len(encoded), configs[0].cluster.session_micrographs)]
    start = time.perf_counter()
    session = fit(sample, configs[0], encoder)
    fitted = time.perf_counter() - start
    results = [pick(e, c, encoder, session) for e, c in zip(encoded, configs)]
    picking = (time.perf_counter() - start - fitted) / len(items)
    return results, session.summary(), {"session_fit_s": fitted, "pick_s_per_micrograph": picking}


def at_thresholds(results: list, items: list) -> dict:
    out = {}
    for threshold in THRESHOLDS:
        scores = [score_micrograph(repick(r, c.model_copy(update={"postprocess": c.postprocess.model_copy(update={"threshold": threshold})})).xy,
                                   truth, c.preprocess.diameter_px) for r, (_, truth, c) in zip(results, items)]
        total = pooled(scores)
        out[str(threshold)] = {"f1": total.f1, "precision": total.precision, "recall": total.recall, "picks": total.picks}
    return out


def dropped(summary: dict) -> list[dict]:
    classes = (summary or {}).get("classes") or {}
    return [c for c in classes.get("each", []) if not c["kept"]]


def real_rows(encoder: Encoder, data: Path, split: str) -> list[dict]:
    rows = []
    for folder in sorted(p.parent for p in data.glob("*/manifest.json")):
        items = split_items(folder, split)
        for name, override in VARIANTS.items():
            results, summary, times = session_picks(encoder, items, override)
            rows.append({"dataset": folder.name, "variant": name, "micrographs": len(items), **times, "at": at_thresholds(results, items),
                         "dropped_classes": dropped(summary), "classes_judged": ((summary or {}).get("classes") or {}).get("judged")})
            log.info("%s %s: %s", folder.name, name, {t: round(v["f1"], 3) for t, v in rows[-1]["at"].items()})
    return rows


def junk_rows(encoder: Encoder) -> list[dict]:
    rows = []
    for session, spec in JUNK_SESSIONS.items():
        with tempfile.TemporaryDirectory() as tmp:
            junk_items = write_junk_session(Path(tmp), spec)
            items = [(path, truth, config) for path, truth, _, config in junk_items]
            for name, override in VARIANTS.items():
                results, summary, times = session_picks(encoder, items, override)
                on = sum(on_junk(r.xy, mask, c.preprocess.diameter_px) for r, (_, _, mask, c) in zip(results, junk_items))
                picks = sum(len(r.xy) for r in results)
                rows.append({"session": session, "variant": name, **times, "at": at_thresholds(results, items), "picks_on_junk": on,
                             "junk_share": on / max(1, picks), "dropped_classes": dropped(summary)})
                log.info("junk %s %s: F1 %.3f, %.1f %% on junk", session, name, rows[-1]["at"]["0.5"]["f1"], 100 * rows[-1]["junk_share"])
    return rows


def ucsf_rows(encoder: Encoder) -> list[dict]:
    if not UCSF.is_dir():
        log.warning("no %s: skipped", UCSF)
        return []
    mask = read_micrograph(UCSF / "junk_mask.mrc").data > 0.5
    rows = []
    for diameter in (20.0, 24.0, 32.0, 40.0):
        config = EmmaeConfig.model_validate({"preprocess": {"diameter_px": diameter}})
        for name, override in VARIANTS.items():
            results, summary, _ = session_picks(encoder, [(UCSF / "micrograph.mrc", np.zeros((0, 2)), config)], override)
            xy = np.round(results[0].xy).astype(int)
            inside = int(mask[xy[:, 1].clip(0, mask.shape[0] - 1), xy[:, 0].clip(0, mask.shape[1] - 1)].sum()) if len(xy) else 0
            rows.append({"diameter_px": diameter, "variant": name, "picks": len(xy), "inside_mask": inside, "dropped_classes": dropped(summary)})
            log.info("UCSF-1142 at %g px %s: %d of %d picks inside the mask", diameter, name, inside, len(xy))
    return rows


def print_tables(record: dict) -> None:
    print("\n| dataset | variant | F1 at 0.5 | precision 0.5 / 0.9 | recall 0.5 / 0.9 | fit s | pick s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in record["real"] + record["junk"]:
        at = row["at"]
        print(f"| {row.get('dataset', row.get('session'))} | {row['variant']} | {at['0.5']['f1']:.3f} | {at['0.5']['precision']:.3f} / "
              f"{at['0.9']['precision']:.3f} | {at['0.5']['recall']:.3f} / {at['0.9']['recall']:.3f} | {row['session_fit_s']:.2f} | "
              f"{row['pick_s_per_micrograph']:.2f} |" + (f" junk {100 * row['junk_share']:.1f} %" if "junk_share" in row else ""))
    for row in record["ucsf"]:
        print(f"UCSF-1142 {row['diameter_px']:g} px {row['variant']}: {row['inside_mask']} of {row['picks']} inside the mask")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the bundled model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", type=Path, default=RESULTS / "classes.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    retain_freed_memory()
    encoder = Encoder.open(args.bundle)
    start = time.perf_counter()
    record = {"bundle": str(encoder.bundle.path.name), "split": args.split, "real": real_rows(encoder, args.data, args.split) if args.data.is_dir() else [],
              "junk": junk_rows(encoder), "ucsf": ucsf_rows(encoder)}
    record["seconds"] = time.perf_counter() - start
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print_tables(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
