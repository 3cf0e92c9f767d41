"""Particle centres from coordinate files: RELION STAR, CSV (``x,y``), EMAN BOX and crYOLO CBOX.

All return float64 ``[N, 2]`` centres (x = column, y = row, input-micrograph pixels;
see :mod:`emmae.io.coords`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emmae.io.star import read_star


class CoordinateFileError(ValueError):
    """A coordinate file that cannot be read as particle centres."""


def read_centres(path: str | Path) -> np.ndarray:
    """Centres from ``.star``, ``.csv``, ``.box`` or ``.cbox`` (the last two: corner + half the box size).

    Raises:
        CoordinateFileError: unknown extension or missing columns.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        frames = [f for f in read_star(path).values() if {"rlnCoordinateX", "rlnCoordinateY"} <= set(f.columns)]
        if not frames:
            raise CoordinateFileError(f"{path}: no loop with rlnCoordinateX/rlnCoordinateY")
        return frames[0][["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    if suffix == ".cbox":
        blocks = read_star(path)
        boxes = blocks.get("cryolo")
        if boxes is None or not {"CoordinateX", "CoordinateY", "Width", "Height"} <= set(boxes.columns):
            raise CoordinateFileError(f"{path}: no data_cryolo loop with _CoordinateX/_CoordinateY/_Width/_Height")
        corner = boxes[["CoordinateX", "CoordinateY"]].to_numpy(dtype=np.float64)
        return corner + boxes[["Width", "Height"]].to_numpy(dtype=np.float64) / 2
    if suffix == ".csv":
        frame = pd.read_csv(path)
        if not {"x", "y"} <= set(frame.columns):
            raise CoordinateFileError(f"{path}: needs columns x and y, has {list(frame.columns)}")
        return frame[["x", "y"]].to_numpy(dtype=np.float64)
    if suffix == ".box":
        rows = np.loadtxt(path, ndmin=2)
        if rows.size == 0:
            return np.zeros((0, 2))
        if rows.shape[1] < 4:
            raise CoordinateFileError(f"{path}: EMAN box lines need x y width height")
        return rows[:, :2] + rows[:, 2:4] / 2
    raise CoordinateFileError(f"{path}: unknown coordinate format {suffix!r} (use .star, .csv, .box or .cbox)")
