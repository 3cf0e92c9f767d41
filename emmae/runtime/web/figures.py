"""The web view's figures, computed from what a folder records (pure functions, no I/O).

* :func:`counts`: picked, failed, waiting micrographs and particles;
* :func:`pace`: throughput, acquisition rate and latency over the last ``WINDOW`` micrographs,
  queue and settling counts, and whether the stream falls behind;
* :func:`series`: particles per micrograph over time; :func:`histogram`: figures of merit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emmae.runtime.stream.status import RATE_WINDOW as WINDOW  # micrographs the rates and latencies are taken over, as on the status line
from emmae.runtime.stream.status import catch_up_s, catch_up_text, rate_per_hour
from emmae.runtime.web.reading import Micrograph

BEHIND_MARGIN = 1.05  # acquiring this much faster than picking, with a backlog, is falling behind
FOM_BINS = 20


def counts(micrographs: Sequence[Micrograph]) -> dict:
    """Micrographs by state and particles picked (a micrograph picked again counts once)."""
    picked = [m for m in micrographs if m.state == "picked"]
    particles = sum(m.particles or 0 for m in picked)
    return {
        "picked": len(picked), "failed": sum(m.state == "failed" for m in micrographs),
        "waiting": sum(m.state in ("seen", "processing") for m in micrographs), "particles": particles,
        "particles_per_micrograph": particles / len(picked) if picked else None,
    }


def pace(micrographs: Sequence[Micrograph], queue_depth: int, live: dict | None = None) -> dict:
    """Throughput against the acquisition rate, latency, queue and settling counts, and the falling-behind warning.

    ``live``: the running daemon's own figures (:mod:`.live`), which take precedence over what the journal shows.
    """
    picked = [m for m in micrographs if m.state == "picked"]
    latencies = [m.latency_s for m in picked[-WINDOW:] if m.latency_s is not None]
    acquired = rate_per_hour([m.acquired_at for m in micrographs if m.state in ("picked", "failed")])
    throughput = rate_per_hour([m.recorded_at for m in picked])
    waiting = sum(m.state in ("seen", "processing") for m in micrographs)
    figures = {
        "throughput_per_hour": throughput, "acquisition_per_hour": acquired,
        "latency_last_s": latencies[-1] if latencies else None,
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        "queued": None, "settling": None, "waiting": waiting, "queue_depth": queue_depth, "backlog_growing": None,
    }
    if live is not None:
        figures.update({k: live[k] for k in ("queued", "settling", "backlog_growing") if k in live})
        figures["throughput_per_hour"] = live.get("throughput_per_hour") or throughput
        figures["latency_last_s"] = live.get("latency_last_s", figures["latency_last_s"])
        figures["waiting"] = (live.get("queued") or 0) + (live.get("settling") or 0)
    figures["falling_behind"], figures["warning"] = behind(figures)
    backlog = figures["queued"] if figures["queued"] is not None else figures["waiting"]
    figures["behind_s"] = catch_up_s(backlog, figures["throughput_per_hour"]) if figures["falling_behind"] else None
    return figures


def behind(figures: dict) -> tuple[bool, str | None]:
    """Falling behind: more micrographs wait than the queue holds, and their number grows or they land faster than
    they are picked. Returns the verdict and the warning to show."""
    backlog = figures["queued"] if figures["queued"] is not None else figures["waiting"]
    picking, landing = figures["throughput_per_hour"], figures["acquisition_per_hour"]
    outpaced = picking is not None and landing is not None and landing > BEHIND_MARGIN * picking
    if backlog <= figures["queue_depth"] or not (figures["backlog_growing"] or outpaced):
        return False, None
    rates = f"picking {picking or 0:.0f} per hour" + (f", acquiring {landing:.0f} per hour" if landing is not None else "")
    return True, f"falling behind the acquisition: {backlog} micrographs wait to be picked, {catch_up_text(backlog, picking)}; {rates}"


def series(micrographs: Sequence[Micrograph], limit: int) -> list[dict]:
    """The last ``limit`` picked micrographs, oldest first: stem, name, particles, latency and when recorded."""
    picked = [m for m in micrographs if m.state == "picked"][-limit:]
    return [{"stem": m.stem, "name": m.name, "particles": m.particles, "latency_s": m.latency_s, "picked_at": m.recorded_at,
             "model": m.model} for m in picked]


def histogram(scores: np.ndarray, bins: int = FOM_BINS) -> dict:
    """Counts of figures of merit (0-1) in ``bins`` equal bins; ``edges`` has ``bins + 1`` values."""
    values = np.clip(np.asarray(scores, np.float64).reshape(-1), 0.0, 1.0)
    found, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in found], "picks": int(values.size)}
