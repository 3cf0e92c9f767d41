"""Preview thumbnails: the micrograph, contrast-stretched and binned, with its picks circled."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from emmae.errors import OutputError
from emmae.io.atomic import atomic_path


def render_preview(image: np.ndarray, xy: np.ndarray, diameter_px: float, max_side: int = 1024) -> np.ndarray:
    """BGR uint8 thumbnail (longer side ``max_side`` at most) with a circle at every pick."""
    scale = min(1.0, max_side / max(image.shape))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = cv2.resize(np.asarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(small, (1, 99))
    grey = np.clip((small - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    canvas = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    radius = max(2, round(diameter_px * scale / 2))
    for x, y in np.asarray(xy, dtype=np.float64).reshape(-1, 2):
        centre = (round((x + 0.5) * scale - 0.5), round((y + 0.5) * scale - 0.5))  # x = column, y = row
        cv2.circle(canvas, centre, radius, (0, 200, 255), 1, lineType=cv2.LINE_AA)
    return canvas


def write_preview(path: Path, image: np.ndarray, xy: np.ndarray, diameter_px: float) -> None:
    """Write :func:`render_preview` as PNG (or JPEG, by the suffix), atomically."""
    ok, encoded = cv2.imencode(Path(path).suffix or ".png", render_preview(image, xy, diameter_px))
    if not ok:
        raise ValueError(f"cannot encode a preview as {Path(path).suffix}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def render_class_montage(averages: list[np.ndarray], labels: list[str], kept: list[bool], tile_px: int = 128, columns: int = 6) -> np.ndarray:
    """BGR uint8 montage of class averages: each contrast-stretched on its own, framed green (kept) or red (dropped), labelled below
    (a label's lines split at ``|``)."""
    rows = max(1, -(-len(averages) // columns))
    label_px = 32
    canvas = np.full((rows * (tile_px + label_px), min(columns, max(1, len(averages))) * tile_px, 3), 255, np.uint8)
    for i, (average, label, keep) in enumerate(zip(averages, labels, kept)):
        tile = cv2.resize(np.asarray(average, np.float32), (tile_px, tile_px), interpolation=cv2.INTER_LINEAR)
        lo, hi = np.percentile(tile, (1, 99))
        grey = np.clip((tile - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
        top, left = (i // columns) * (tile_px + label_px), (i % columns) * tile_px
        canvas[top : top + tile_px, left : left + tile_px] = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        cv2.rectangle(canvas, (left + 1, top + 1), (left + tile_px - 2, top + tile_px - 2), (60, 180, 60) if keep else (40, 40, 220), 3)
        for line, text in enumerate(label.split("|")):
            cv2.putText(canvas, text, (left + 4, top + tile_px + 13 + 14 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_class_montage(path: Path, averages: list[np.ndarray], labels: list[str], kept: list[bool]) -> None:
    """Write :func:`render_class_montage` as PNG, atomically. Raises OutputError: it cannot be encoded or written."""
    ok, encoded = cv2.imencode(".png", render_class_montage(averages, labels, kept))
    if not ok:
        raise OutputError(f"{path}: cannot encode the class montage")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
