"""Pick files that RELION, cryoSPARC, EMAN and crYOLO import without edits. All writes are atomic.

* ``<stem>_autopick.star``: RELION coordinates of one micrograph
  (``_rlnCoordinateX _rlnCoordinateY _rlnClassNumber _rlnAutopickFigureOfMerit _rlnAnglePsi``);
* ``autopick.star``: RELION 4/5 index (``data_coordinate_files``: ``_rlnMicrographName
  _rlnMicrographCoordinates``), names copied verbatim;
* ``particles.star``: every pick with ``_rlnMicrographName``, for cryoSPARC's "Import
  Particle Stack"/coordinate import; RELION takes the coordinates through ``autopick.star``
  (this file has no optics block and is not a RELION particles file);
* ``micrographs.star``: each micrograph's width, height and pixel size (a summary for
  cryoSPARC and scripts, not a RELION micrographs file: no optics block);
* ``<stem>.box``: EMAN boxes (lower-left corner, box size); ``<stem>.cbox``: crYOLO CBOX 1.0
  (``data_global``, ``data_cryolo``, an empty ``data_cryolo_include`` for a 2-D micrograph),
  every candidate whose box lies inside the micrograph with its confidence, before any threshold;
  ``_Width``/``_Height`` are the box, ``_EstWidth``/``_EstHeight`` the particle diameter.

The explicit switches of :class:`~emmae.config.OutputConfig` apply, in this order:
``flip_y`` (``y -> ny - 1 - y`` in the picked micrograph), then ``coordinate_scale``.
Nothing is ever flipped or scaled silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from emmae.config import OutputConfig
from emmae.io.atomic import write_bytes_atomic
from emmae.io.star import write_star


def transform_xy(xy: np.ndarray, shape: tuple[int, int], output: OutputConfig) -> np.ndarray:
    """Apply the explicit ``flip_y`` and ``coordinate_scale`` switches to ``[N, 2]`` (x, y)."""
    out = np.array(xy, dtype=np.float64).reshape(-1, 2)
    if output.flip_y:
        out[:, 1] = shape[0] - 1 - out[:, 1]
    return out * output.coordinate_scale


def micrograph_name(path: str | PurePath, output: OutputConfig) -> str:
    """The name written as ``_rlnMicrographName``: relative to ``project_root`` when set,
    then ``strip_prefix`` removed and ``add_prefix`` added, as explicit switches."""
    name = str(path)
    if output.project_root is not None:
        try:
            name = str(Path(path).resolve().relative_to(Path(output.project_root).resolve()))
        except ValueError:
            pass
    if output.strip_prefix and name.startswith(output.strip_prefix):
        name = name[len(output.strip_prefix) :]
    return output.add_prefix + name


def relion_coordinates(xy: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnCoordinateX": np.round(xy[:, 0], 2), "rlnCoordinateY": np.round(xy[:, 1], 2),
        "rlnClassNumber": np.zeros(len(xy), dtype=int), "rlnAutopickFigureOfMerit": np.round(score, 4),
        "rlnAnglePsi": np.full(len(xy), -999.0),
    })


def write_relion_coordinates(path: Path, xy: np.ndarray, score: np.ndarray) -> None:
    """One micrograph's RELION coordinate STAR."""
    write_star(path, relion_coordinates(xy, score))


def write_index(path: Path, entries: Sequence[tuple[str, str]]) -> None:
    """RELION's ``autopick.star``: (micrograph name, coordinate file) rows."""
    frame = pd.DataFrame(entries, columns=["rlnMicrographName", "rlnMicrographCoordinates"])
    write_star(path, {"coordinate_files": frame})


def write_particles(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """All picks of a session with their micrograph names: (name, xy, score) per micrograph."""
    frames = [relion_coordinates(xy, score).assign(rlnMicrographName=name) for name, xy, score in rows]
    frame = pd.concat(frames, ignore_index=True) if frames else relion_coordinates(np.zeros((0, 2)), np.zeros(0)).assign(rlnMicrographName=[])
    write_star(path, {"particles": frame[["rlnMicrographName", *relion_coordinates(np.zeros((0, 2)), np.zeros(0)).columns]]})


def write_micrographs(path: Path, rows: Sequence[tuple[str, tuple[int, int], float | None]]) -> None:
    """Each picked micrograph's name, width and height (pixels) and pixel size (A, 0 if unknown)."""
    frame = pd.DataFrame({
        "rlnMicrographName": [name for name, _, _ in rows],
        "rlnImageSizeX": [shape[1] for _, shape, _ in rows],
        "rlnImageSizeY": [shape[0] for _, shape, _ in rows],
        "rlnMicrographPixelSize": [round(px or 0.0, 5) for _, _, px in rows],
    })
    write_star(path, {"micrographs": frame})


def write_box(path: Path, xy: np.ndarray, box_px: float) -> None:
    """EMAN ``.box``: ``x_ll y_ll w h`` per line, tab-separated (corner = centre - box / 2)."""
    size = int(round(box_px))
    lines = [f"{int(round(x - size / 2))}\t{int(round(y - size / 2))}\t{size}\t{size}" for x, y in xy]
    write_bytes_atomic(path, ("\n".join(lines) + ("\n" if lines else "")).encode())


def write_cbox(path: Path, xy: np.ndarray, confidence: np.ndarray, box_px: float, particle_px: float | None = None,
               size_xy: tuple[float, float] | None = None) -> None:
    """crYOLO CBOX 1.0 with every candidate (lower-left corners) and its confidence.

    ``particle_px``: the particle diameter (``_EstWidth``/``_EstHeight``; default the box);
    ``size_xy``: the micrograph's (width, height) in the written coordinates; candidates whose
    box reaches outside it are left out, as crYOLO writes none.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    corner = xy - box_px / 2
    if size_xy is not None:
        inside = np.all((corner >= 0) & (corner + box_px <= np.asarray(size_xy, dtype=np.float64)), axis=1)
        corner, confidence = corner[inside], confidence[inside]
    n = len(corner)
    est = box_px if particle_px is None else particle_px
    boxes = pd.DataFrame({
        "CoordinateX": np.round(corner[:, 0], 2), "CoordinateY": np.round(corner[:, 1], 2),
        "CoordinateZ": np.full(n, np.nan), "Width": np.full(n, box_px), "Height": np.full(n, box_px),
        "Depth": np.full(n, np.nan), "EstWidth": np.full(n, est), "EstHeight": np.full(n, est),
        "Confidence": np.round(confidence, 4), "NumBoxes": np.full(n, np.nan), "Angle": np.full(n, np.nan),
    })
    include = pd.DataFrame({"slice_index": np.zeros(0, dtype=int)})  # 2-D: no slices
    write_star(path, {"global": {"cbox_format_version": "1.0"}, "cryolo": boxes, "cryolo_include": include})
