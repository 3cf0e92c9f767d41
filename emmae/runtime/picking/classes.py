"""Session classes: the session's candidates sorted into classes, and the classes a person would keep.

What a person does with any picker's output is 2D classification, then keeps the
classes that look like the particle. The session does it once, before it picks:

* **Candidates.** Every template peak of the session's sample at figure of merit
  >= ``CANDIDATE_MERIT`` (recall first: far more than the picks).
* **Features that ignore in-plane rotation.** Around each candidate the class image
  (the binned micrograph, lightly smoothed, centred on its median and scaled by its
  MAD, particles dark, *not* clipped: contrast relative to the session's particles
  is kept) is sampled on ``RADII`` rings out to ``REACH_DIAMETERS`` x ``ANGLES``
  angles; its rotational average is the radial profile ``[R]``; the mean power of the
  first angular harmonic says how one-sided it is (an edge). With latent vetting, the
  candidate's latent descriptor in the population's whitened axes joins them.
* **Classes.** k-means (the method's own, NumPy or CuPy) on those features, each
  block scaled by its spread over the candidates.
* **Judgement, against what the user said.** Each class's mean radial profile gives
  its response to a dark blob at ``SCALES_DIAMETERS`` of the particle diameter (the
  scale-normalised LoG at the centre, a linear map of the rotational average). A class
  is junk when it is, relative to the session's typical class (the count-weighted
  median), **far darker** (ice, contamination), **empty** (no contrast at any scale:
  a light centre, as a ring or a shell shows, is contrast too) or **far larger**
  (carbon, aggregates: as strong at 4/3 of the diameter as at its best, and darker
  than the typical class), or sits **on a dark body** (its median level two of the
  micrograph's MADs below the typical class's: inside contamination). Every rule needs the difference to stand ``SIGNIFICANCE``
  standard errors clear of the class's own noise, and no class is judged in a
  session whose typical class is itself indistinct (faint data: the latents still
  vet it). Size is measured (each class's ``blob_diameters``) but is no rule: a class
  of dark specks a third of the diameter across mixes with the particles whose dark
  core is half of it, and a rule on it costs real particles (a person drops such a
  class by number).
* **Assignment.** A micrograph's candidates go to the nearest class (no refit).

Everything here runs on the host except the class image's smoothing; the classes are
small and saved with the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from emmae.backend import backend_of, to_host
from emmae.runtime.kernels.filters import Array
from emmae.runtime.kernels.kmeans import assign, fit

CANDIDATE_MERIT = 0.3  # the session's candidates: template peaks at this figure of merit or more
RADII, ANGLES = 17, 24  # polar sampling of a candidate's surround
REACH_DIAMETERS = 1.0  # out to this radius (a box of 2 diameters; the class montage shows 1.5)
SMOOTH_DIAMETERS = 0.035  # the class image's Gaussian (as the template's matching image)
SCALES_DIAMETERS = (1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0, 4 / 3)  # blob diameters the classes are measured at
PARTICLE_SCALES = (3, 4)  # half and two thirds of the diameter: a particle's visible core to its whole
DARKER, EMPTY, LARGER = 3.0, 0.25, 1.5  # ratios to the typical class's darkness
SIGNIFICANCE = 3.0  # standard errors a difference must stand clear of
ON_DARK_BODY = 2.0  # a class whose median level lies this many MADs below the typical class's sits on ice or contamination
DISTINCT = 4.0  # the typical class's darkness, in its standard errors, before any class is judged
MONTAGE_PX = 32  # side of each class average kept for the montage
LATENT_WEIGHT = 0.5  # the latents' share of the distance, beside the image features


@dataclass(frozen=True)
class SessionClass:
    """One class: its members, whether it is a particle class, and why not."""

    index: int
    count: int
    kept: bool
    reasons: tuple[str, ...]
    darkness: float  # response at the particle's scale over the typical class's
    blob_diameters: float  # the blob diameter (in particle diameters) it responds to most
    average: np.ndarray  # [MONTAGE_PX, MONTAGE_PX] mean of its members' class images (1.5 diameters across)

    @property
    def short_reason(self) -> str:
        """A word or two for the montage: why the session dropped it (empty when it is kept)."""
        words = {"far darker": "far darker", "empty": "empty", "larger": "larger", "on a body": "on a dark body"}
        return ", ".join(next((w for start, w in words.items() if r.startswith(start)), "junk") for r in self.reasons)

    @property
    def empty(self) -> bool:
        """Dropped only for lack of contrast: background, which a figure-of-merit calibration needs to see."""
        return not self.kept and all(reason.startswith("empty") for reason in self.reasons)

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "kept": self.kept, "reasons": list(self.reasons), "darkness": round(self.darkness, 4),
                "blob_diameters": round(self.blob_diameters, 4), "average": np.round(self.average, 3).tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> SessionClass:
        return cls(int(data["index"]), int(data["count"]), bool(data["kept"]), tuple(data["reasons"]), float(data["darkness"]),
                   float(data["blob_diameters"]), np.asarray(data["average"], np.float32))


def chosen_classes(kept: Iterable[int], keep: Iterable[int] = (), drop: Iterable[int] = ()) -> set[int]:
    """The classes kept: the session's ``kept``, with a user's ``keep`` added and ``drop`` taken away (a drop wins)."""
    return (set(kept) | set(keep)) - set(drop)


@dataclass(frozen=True)
class SessionClasses:
    """The session's classes: ``centroids [K, F]`` in scaled feature space, how features are scaled, and each class."""

    centroids: np.ndarray
    scales: np.ndarray  # [F] divisor of each feature
    latent_dims: int  # trailing features that are latents (0: none)
    classes: tuple[SessionClass, ...]
    judged: bool  # False: the typical class was too faint to judge any (all kept)

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.classes if c.kept)

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The class ``[N]`` of each candidate's features ``[N, F]`` (nearest centroid)."""
        if len(features) == 0:
            return np.zeros(0, np.int64)
        return np.asarray(assign(np.asarray(features / self.scales, np.float32), self.centroids), np.int64)

    def kept_mask(self, labels: np.ndarray, keep: tuple[int, ...] = (), drop: tuple[int, ...] = ()) -> np.ndarray:
        """Bool ``[N]``: the candidates whose class is kept, with a user's ``keep``/``drop`` of class numbers over the session's choice."""
        chosen = chosen_classes(self.kept, keep, drop)
        table = np.array([c.index in chosen for c in self.classes] + [True], bool)  # -1 (unclassified, older files) is kept
        return table[np.asarray(labels, np.int64)]

    def montage(self, keep: tuple[int, ...] = (), drop: tuple[int, ...] = ()) -> tuple[list[np.ndarray], list[str], list[bool]]:
        """Each class's average, its label (number, count, verdict; why, or its darkness and size) and whether it is kept, with a
        user's ``keep``/``drop`` over the session's choice."""
        chosen = chosen_classes(self.kept, keep, drop)
        kept = [c.index in chosen for c in self.classes]
        labels = [f"{c.index}: {c.count} {'kept' if k else 'dropped'}|"
                  + (c.short_reason if not c.kept and not k else "by you" if c.kept != k else f"x{c.darkness:.1f} dark, {c.blob_diameters:.2f} d")
                  for c, k in zip(self.classes, kept)]
        return [c.average for c in self.classes], labels, kept

    def summary(self) -> list[dict]:
        return [{"class": c.index, "count": c.count, "kept": c.kept, "why": "; ".join(c.reasons) or "like the session's particles",
                 "darkness": round(c.darkness, 2), "blob_diameters": round(c.blob_diameters, 2)} for c in self.classes]

    def to_dict(self) -> dict:
        return {"centroids": np.asarray(self.centroids, np.float64).tolist(), "scales": np.asarray(self.scales, np.float64).tolist(),
                "latent_dims": self.latent_dims, "classes": [c.to_dict() for c in self.classes], "judged": self.judged}

    @classmethod
    def from_dict(cls, data: dict) -> SessionClasses:
        """Raises: KeyError, ValueError, TypeError: not a session's classes."""
        centroids = np.asarray(data["centroids"], np.float32)
        scales = np.asarray(data["scales"], np.float64)
        if centroids.ndim != 2 or scales.shape != centroids.shape[1:]:
            raise ValueError("inconsistent class shapes")
        return cls(centroids, scales, int(data["latent_dims"]), tuple(SessionClass.from_dict(c) for c in data["classes"]), bool(data["judged"]))


def class_image(binned: Array, diameter_grid_px: float, contrast: str) -> np.ndarray:
    """The binned micrograph smoothed, centred on its median and scaled by its MAD, particles dark; not clipped (host ``[H, W]``)."""
    backend = backend_of(binned)
    image = backend.ndimage.gaussian_filter(binned.astype(np.float32), SMOOTH_DIAMETERS * diameter_grid_px, mode="reflect")
    image = np.asarray(to_host(image), np.float32)
    centre = float(np.median(image))
    spread = 1.4826 * float(np.median(np.abs(image - centre)))
    image = (image - centre) / max(spread, 1e-12)
    return -image if contrast == "bright" else image


def polar(image: np.ndarray, xy: np.ndarray, diameter_grid_px: float) -> np.ndarray:
    """``image`` around each centre ``xy [N, 2]`` on ``RADII`` rings out to ``REACH_DIAMETERS`` x ``ANGLES``: ``[N, R, T]``."""
    radii = np.linspace(0, REACH_DIAMETERS * diameter_grid_px, RADII)
    angles = np.arange(ANGLES) * 2 * np.pi / ANGLES
    x = xy[:, 0, None, None] + (radii[:, None] * np.cos(angles))[None]
    y = xy[:, 1, None, None] + (radii[:, None] * np.sin(angles))[None]
    return ndi.map_coordinates(image, [y.ravel(), x.ravel()], order=1, mode="mirror").reshape(len(xy), RADII, ANGLES)


def image_features(image: np.ndarray, xy: np.ndarray, diameter_grid_px: float) -> np.ndarray:
    """Rotation-free features ``[N, S + 2]``: the blob responses at ``SCALES_DIAMETERS``, the level (the mean over the
    particle's disk, in the micrograph's MADs from its median) and the first angular harmonic's mean power."""
    rings = polar(image, np.asarray(xy, np.float64).reshape(-1, 2), diameter_grid_px)
    profile = rings.mean(axis=2)  # [N, R]
    response = -(profile @ blob_weights())  # [N, S]: positive on a dark centre
    level = profile[:, : RADII // 2 + 1].mean(axis=1, keepdims=True)
    one_sided = np.abs(np.fft.rfft(rings, axis=2)[:, :, 1]).mean(axis=1, keepdims=True) / ANGLES
    return np.concatenate([response, level, one_sided], axis=1)


def blob_weights() -> np.ndarray:
    """``[R, S]``: a radial profile's scale-normalised LoG response at the centre, per scale of ``SCALES_DIAMETERS`` (diameter 1)."""
    radii = np.linspace(0, REACH_DIAMETERS, RADII)
    step = radii[1] - radii[0]
    area = 2 * np.pi * np.maximum(radii, step / 4) * step  # ring areas
    columns = []
    for scale in SCALES_DIAMETERS:
        sigma = scale / (2 * np.sqrt(2))
        r2 = radii**2 / sigma**2
        kernel = (1 - r2 / 2) * np.exp(-r2 / 2) * area  # minus the Laplacian of a Gaussian
        kernel -= area * kernel.sum() / area.sum()  # zero sum over the reach: a flat surround gives nothing
        columns.append(kernel / np.abs(kernel).sum())
    return np.stack(columns, axis=1)


def fit_classes(features: np.ndarray, latents: np.ndarray | None, boxes: np.ndarray, merit: np.ndarray, count: int,
                seed: int) -> SessionClasses | None:
    """The session's classes from its candidates' ``features [N, S + 2]`` (and whitened ``latents [N, m]``); None with too few.

    ``boxes [N, MONTAGE_PX, MONTAGE_PX]``: each candidate's class image, for the class averages; ``merit [N]``: their
    figures of merit (the typical class is that of the typical likely particle, figure of merit >= 0.5).
    """
    if len(features) < 4 * count:
        return None
    scales_count = len(SCALES_DIAMETERS)
    blocks = [features[:, :scales_count], features[:, scales_count:]] + ([latents] if latents is not None else [])
    spread = [max(float(np.median(np.abs(b - np.median(b, axis=0)))), 1e-6) * np.sqrt(b.shape[1]) for b in blocks]
    weight = [1.0, 1.0] + ([1 / LATENT_WEIGHT - 1] if latents is not None else [])
    scales = np.concatenate([np.full(b.shape[1], s * w) for b, s, w in zip(blocks, spread, weight)])
    points = np.concatenate(blocks, axis=1) / scales
    centroids = to_host(fit(np.asarray(points, np.float32), count, seed=seed, max_iter=100).centroids)
    labels = np.asarray(assign(np.asarray(points, np.float32), centroids), np.int64)
    judged, classes = judge(features[:, :scales_count], features[:, scales_count], labels, count, boxes, merit >= 0.5)
    return SessionClasses(np.asarray(centroids, np.float32), scales, 0 if latents is None else latents.shape[1], classes, judged)


def judge(response: np.ndarray, level: np.ndarray, labels: np.ndarray, count: int, boxes: np.ndarray,
          likely: np.ndarray) -> tuple[bool, tuple[SessionClass, ...]]:
    """Each class judged from its members' blob ``response [N, S]`` and ``level [N]``; whether the session was distinct enough to judge.

    ``likely [N]``: the likely particles, whose classes weigh in the typical class.
    """
    members = [labels == k for k in range(count)]
    sizes = np.array([m.sum() for m in members])
    weights = np.array([(m & likely).sum() for m in members]) if likely.any() else sizes
    mean = np.stack([response[m].mean(axis=0) if s else np.zeros(response.shape[1]) for m, s in zip(members, sizes)])
    error = np.stack([response[m].std(axis=0) / np.sqrt(s) if s > 1 else np.full(response.shape[1], np.inf) for m, s in zip(members, sizes)])
    dark = mean[:, PARTICLE_SCALES].max(axis=1)
    dark_error = error[:, PARTICLE_SCALES].max(axis=1)
    typical = weighted_median(dark, weights)
    typical_error = float(np.median(dark_error[sizes > 1])) if np.any(sizes > 1) else np.inf
    distinct = typical > DISTINCT * typical_error
    levels = np.array([float(np.median(level[m])) if s else 0.0 for m, s in zip(members, sizes)])
    typical_level = weighted_median(levels, weights)
    classes = []
    for k in range(count):
        reasons = reasons_of(mean[k], error[k], dark[k], dark_error[k], typical) if distinct and sizes[k] else ()
        if sizes[k] and levels[k] < typical_level - ON_DARK_BODY:
            reasons += (f"on a body far darker than the micrograph ({levels[k]:.1f} MADs against {typical_level:.1f}): ice or contamination",)
        average = boxes[members[k]].mean(axis=0) if sizes[k] else np.zeros((MONTAGE_PX, MONTAGE_PX), np.float32)
        classes.append(SessionClass(k, int(sizes[k]), not reasons, reasons, float(dark[k] / typical) if typical > 0 else 0.0,
                                    float(SCALES_DIAMETERS[int(np.argmax(mean[k]))]), np.asarray(average, np.float32)))
    return bool(distinct), tuple(classes)


def reasons_of(mean: np.ndarray, error: np.ndarray, dark: float, dark_error: float, typical: float) -> tuple[str, ...]:
    """Why one class (``mean``/``error`` ``[S]`` blob responses) is not the session's particle; none when it is."""
    reasons = []
    clear = SIGNIFICANCE * dark_error
    if dark > DARKER * typical + clear:
        reasons.append(f"far darker than the session's particles ({dark / typical:.1f}x): ice or contamination")
    structure = float(np.max(np.abs(mean)))  # a light centre (a ring, a shell) is structure too
    if structure < EMPTY * typical - SIGNIFICANCE * float(np.max(error)):
        reasons.append(f"empty: {structure / typical:.2f}x the particles' contrast at any scale")
    best, large = int(np.argmax(mean)), len(SCALES_DIAMETERS) - 1
    if mean[large] >= 0.8 * mean[best] and dark > LARGER * typical + clear:
        reasons.append("larger than the particle: carbon, an aggregate or contamination")
    return tuple(reasons)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    total = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(total, total[-1] / 2)])


def montage_boxes(image: np.ndarray, xy: np.ndarray, diameter_grid_px: float) -> np.ndarray:
    """Each centre's surround, 1.5 diameters across, resampled to ``[N, MONTAGE_PX, MONTAGE_PX]``."""
    half = 0.75 * diameter_grid_px
    offsets = np.linspace(-half, half, MONTAGE_PX)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    rows = xy[:, 1, None, None] + offsets[None, :, None]
    cols = xy[:, 0, None, None] + offsets[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)
    return ndi.map_coordinates(image, [rows.ravel(), cols.ravel()], order=1, mode="mirror").reshape(len(xy), MONTAGE_PX, MONTAGE_PX).astype(np.float32)
