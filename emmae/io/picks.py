"""Pick files that RELION, cryoSPARC, EMAN and crYOLO import without edits, and our own. All writes are atomic.

* :class:`Picks` and ``<stem>_emmae.npz`` (:func:`save_picks` / :func:`load_picks`): one
  micrograph's candidates and particle map, everything a re-threshold needs;

* ``<stem>_autopick.star``: RELION coordinates of one micrograph
  (``_rlnCoordinateX _rlnCoordinateY _rlnClassNumber _rlnAutopickFigureOfMerit _rlnAnglePsi``);
* ``autopick.star``: RELION 4/5 index (``data_coordinate_files``: ``_rlnMicrographName
  _rlnMicrographCoordinates``), names copied verbatim;
* ``particles.star``: every pick with ``_rlnMicrographName``, for cryoSPARC's "Import
  Particle Stack"/coordinate import; with every pixel size known, a ``data_optics`` block
  makes it a RELION 3.1+ particles file (e.g. for ``relion_preprocess --reextract_data_star``);
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

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from emmae.config import OutputConfig
from emmae.io.atomic import atomic_path, write_bytes_atomic
from emmae.io.coords import GridTransform
from emmae.io.star import write_star


@dataclass(frozen=True)
class Picks:
    """Particle picks of one micrograph, in its pixels (x = column, y = row, sub-pixel).

    ``xy``/``score``: the kept picks; ``candidates_xy``/``candidates_score``: every
    candidate before neighbour suppression and the border margin, for re-thresholding.
    """

    name: str
    shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float | None
    diameter_px: float
    xy: np.ndarray
    score: np.ndarray
    candidates_xy: np.ndarray
    candidates_score: np.ndarray
    region: np.ndarray  # bool [h, w]: the particle cluster's latents, for re-thresholding
    transform: GridTransform
    diameter_grid_px: float
    patch_px: int
    timings_s: dict[str, float] = field(default_factory=dict)
    grid_candidates: np.ndarray | None = None  # template: [N, 5] grid x, y, match value, figure of merit, latent distance of every peak
    session: dict | None = None  # the session's particle choice (Session.summary())

    def __len__(self) -> int:
        return len(self.score)


def save_picks(path: Path, result: Picks) -> None:
    """Everything needed to re-threshold ``result`` later, as one ``.npz`` (atomic)."""
    t = result.transform
    meta = {"name": result.name, "shape": list(result.shape), "pixel_size_A": result.pixel_size_A, "diameter_px": result.diameter_px,
            "diameter_grid_px": result.diameter_grid_px, "patch_px": result.patch_px,
            "transform": [list(t.input_shape), list(t.valid_shape), list(t.padded_shape)], "session": result.session}
    arrays = {"region": result.region, "meta": np.array(json.dumps(meta))}
    if result.grid_candidates is not None:
        arrays["grid_candidates"] = result.grid_candidates
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_picks(path: Path) -> Picks:
    """A :class:`Picks` from :func:`save_picks` output, without picks: its candidates and particle map only
    (``emmae.runtime.picking.picker.repick`` cuts them under a configuration).

    Raises:
        OSError: it cannot be read; ValueError, KeyError: it is not such a file.
    """
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        region = saved["region"].astype(bool)
        grid_candidates = saved["grid_candidates"] if "grid_candidates" in saved.files else None
    shapes = [tuple(s) for s in meta["transform"]]
    empty = np.zeros((0, 2))
    return Picks(
        name=meta["name"], shape=tuple(meta["shape"]), pixel_size_A=meta["pixel_size_A"], diameter_px=meta["diameter_px"],
        xy=empty, score=np.zeros(0), candidates_xy=empty, candidates_score=np.zeros(0), region=region,
        transform=GridTransform(*shapes), diameter_grid_px=meta["diameter_grid_px"], patch_px=meta["patch_px"],
        grid_candidates=grid_candidates, session=meta.get("session"),
    )


def transform_xy(xy: np.ndarray, shape: tuple[int, int], output: OutputConfig) -> np.ndarray:
    """Apply the explicit ``flip_y`` and ``coordinate_scale`` switches to ``[N, 2]`` (x, y)."""
    out = np.array(xy, dtype=np.float64).reshape(-1, 2)
    if output.flip_y:
        out[:, 1] = shape[0] - 1 - out[:, 1]
    return out * output.coordinate_scale


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


@dataclass(frozen=True)
class Optics:
    """What a RELION optics block holds beside the pixel size (RELION's import defaults unless known)."""

    voltage_kV: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1


def write_particles(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, float | None]], optics: Optics | None = None) -> None:
    """All picks of a session with their micrograph names: (name, xy, score, pixel size in A of ``xy``) per micrograph.

    With ``optics``, and every pixel size known, it is a RELION 3.1+ particles file: a
    ``data_optics`` block (one group per pixel size) and each particle's ``rlnOpticsGroup``;
    otherwise one ``data_particles`` block (cryoSPARC and scripts read either).
    """
    empty = relion_coordinates(np.zeros((0, 2)), np.zeros(0))
    frames = [relion_coordinates(xy, score).assign(rlnMicrographName=name) for name, xy, score, _ in rows]
    frame = pd.concat(frames, ignore_index=True) if frames else empty.assign(rlnMicrographName=[])
    frame = frame[["rlnMicrographName", *empty.columns]]
    sizes = [px for *_, px in rows]
    if optics is None or not all(px and px > 0 for px in sizes):
        write_star(path, {"particles": frame})
        return
    groups = {px: i + 1 for i, px in enumerate(sorted({round(float(px), 5) for px in sizes}))}
    per_particle = np.concatenate([np.full(len(xy), groups[round(float(px), 5)]) for _, xy, _, px in rows]) if rows else np.zeros(0, int)
    block = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups.values()], "rlnOpticsGroup": list(groups.values()),
        "rlnMicrographOriginalPixelSize": list(groups), "rlnMicrographPixelSize": list(groups),
        "rlnVoltage": optics.voltage_kV, "rlnSphericalAberration": optics.spherical_aberration_mm,
        "rlnAmplitudeContrast": optics.amplitude_contrast,
    })
    write_star(path, {"optics": block, "particles": frame.assign(rlnOpticsGroup=per_particle.astype(int))})


def write_micrographs(path: Path, rows: Sequence[tuple[str, tuple[int, int], float | None]]) -> None:
    """Each picked micrograph's name, width and height (pixels) and pixel size (A, 0 if unknown)."""
    frame = pd.DataFrame({
        "rlnMicrographName": [name for name, _, _ in rows],
        "rlnImageSizeX": [shape[1] for _, shape, _ in rows],
        "rlnImageSizeY": [shape[0] for _, shape, _ in rows],
        "rlnMicrographPixelSize": [round(px or 0.0, 5) for _, _, px in rows],
    })
    write_star(path, {"micrographs": frame})


def write_box(path: Path, xy: np.ndarray, box_px: float, size_xy: tuple[float, float] | None = None) -> None:
    """EMAN ``.box``: ``x_ll y_ll w h`` per line, tab-separated (corner = centre - box / 2).

    ``size_xy``: the micrograph's (width, height) in the written coordinates; a box reaching
    outside it (a negative corner, or past the far edge) is left out, as EMAN and RELION extract none.
    """
    size = int(round(box_px))
    corners = [(int(round(x - size / 2)), int(round(y - size / 2))) for x, y in np.asarray(xy, np.float64).reshape(-1, 2)]
    if size_xy is not None:
        corners = [(x, y) for x, y in corners if x >= 0 and y >= 0 and x + size <= size_xy[0] and y + size <= size_xy[1]]
    lines = [f"{x}\t{y}\t{size}\t{size}" for x, y in corners]
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
