"""What a session of micrographs shares: its latent clusters, the particle choice and the particle template.

Built once from a sample of micrographs (the first ones of a stream, a spread of a
batch) and applied unchanged to every micrograph, so micrographs of one session never
flip between clusters.

* **Clusters.** One k-means per level ``k`` (``cluster.levels``) on latents pooled
  from the sample (smoothed 2 x 2, ``cluster.session_points`` from each micrograph).
* **Particle choice, label-free.** A cluster scores ``blobness x darkness``:
  blobness is how strongly its membership map forms disks of the particle's diameter
  (mean of the strongest 20 % of the peaks of a scale-normalised LoG of the map);
  darkness is how much darker than the micrograph the cluster's area is (particles are
  dark in raw contrast; ``postprocess.contrast`` says otherwise). The best (k, cluster)
  over all levels is the particle cluster; its confidence is ``1 - runner-up / best``
  within its level, and a choice under ``cluster.ambiguous_below`` is warned about.
  In crowded micrographs the gaps between particles also form disks; darkness tells
  them apart.
* **Template.** The radial particle profile learned over the sample
  (:func:`emmae.runtime.picking.localise.learn_profile`), from typical peaks only: with
  ``postprocess.latent_vetting``, the strongest blob peaks whose latents lie outside
  the population of them all (:mod:`emmae.runtime.picking.vetting`: the darkest contamination,
  carbon, ice) are kept out of it.
* **Figure of merit.** The template's match values over the sample set a session-wide
  calibration (:class:`emmae.runtime.picking.localise.Calibration`): 0.5 at the split between
  background and particle peaks, 0.9 at the median particle.
* **Particle population.** With ``postprocess.latent_vetting``, the latents of the
  sample's candidates at figure of merit >= 0.5 (typical ones) form the population
  that vets every micrograph's candidates.
* **Classes.** With ``postprocess.session_classes``, the sample's candidates are sorted
  into classes and each judged particle or junk (:mod:`emmae.runtime.picking.classes`);
  a junk class's members are never picks and, unless the class is merely empty (the
  background, which the calibration separates particles from), the template and the
  figure of merit are learned again without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

from emmae.backend import backend_of, to_host
from emmae.config import EmmaeConfig
from emmae.runtime.picking.cluster import smooth_latents
from emmae.runtime.kernels.filters import Array
from emmae.runtime.kernels.kmeans import assign, fit
from emmae.runtime.picking.classes import CANDIDATE_MERIT, SessionClasses, class_image, fit_classes, image_features, montage_boxes
from emmae.runtime.picking.localise import Calibration, blob_response, calibrate, far_from, find_peaks, learn_profile, match_peaks, matching_image, strongest
from emmae.runtime.picking.vetting import Population, descriptors, fit_population

log = logging.getLogger(__name__)
SESSION_WINDOW = 2  # latent smoothing before the session's clusters
STRONGEST = 0.2  # share of the membership map's peaks that measures its blobness
CORE_KEEP, CORE_ROUNDS = 0.5, 4  # the template's peaks: the core half of the strongest (junk among them may be many)


@dataclass(frozen=True)
class SessionSample:
    """One micrograph of the sample: its matching image ``[H, W]`` (grid), latent map ``[h, w, D]`` (valid part)."""

    image: Array
    latents: Array
    diameter_grid_px: float
    classes_image: np.ndarray | None = None  # [H, W] host: the classes' view of the micrograph (classes.class_image)


@dataclass(frozen=True)
class Session:
    """The session's clusters, particle choice and template (immutable; a new choice is a new object)."""

    centroids: np.ndarray  # [k, D]
    particle_cluster: int
    cluster_scores: tuple[float, ...]  # blobness x darkness of each cluster of the chosen level
    level_scores: dict  # k -> scores of every level
    confidence: float
    ambiguous: bool
    profile: np.ndarray  # radial particle profile in grid pixels, [r + 1]
    diameter_grid_px: float
    micrographs: int
    calibration: Calibration | None = None  # match value -> figure of merit (None: per micrograph, as sessions saved before it)
    population: Population | None = None  # the typical candidates' latents (None: no latent vetting)
    classes: SessionClasses | None = None  # the candidates' classes (None: none sorted)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def summary(self) -> dict:
        """The choice as plain JSON types, for the log and the outputs (no centroids)."""
        return {"k": self.k, "particle_cluster": self.particle_cluster, "confidence": round(self.confidence, 4),
                "ambiguous": self.ambiguous, "cluster_scores": [round(s, 4) for s in self.cluster_scores],
                "micrographs": self.micrographs, "diameter_grid_px": round(self.diameter_grid_px, 3), "id": self.digest(),
                "figure_of_merit": None if self.calibration is None else {"cut": round(self.calibration.cut, 4), "scale": round(self.calibration.scale, 4)},
                "latent_population": None if self.population is None else self.population.candidates,
                "classes": None if self.classes is None else {"kept": list(self.classes.kept), "count": len(self.classes.classes),
                                                               "judged": self.classes.judged, "each": self.classes.summary()}}

    def to_json(self) -> str:
        data = asdict(self)
        data["centroids"] = np.asarray(self.centroids, np.float64).tolist()
        data["profile"] = np.asarray(self.profile, np.float64).tolist()
        data["level_scores"] = {str(k): v for k, v in self.level_scores.items()}
        data["population"] = None if self.population is None else self.population.to_dict()
        data["classes"] = None if self.classes is None else self.classes.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Session:
        """Raises: ValueError, KeyError, TypeError: not a session's JSON."""
        data = json.loads(text)
        data["centroids"] = np.asarray(data["centroids"], np.float32)
        data["profile"] = np.asarray(data["profile"], np.float64)
        data["cluster_scores"] = tuple(data["cluster_scores"])
        data["level_scores"] = {int(k): v for k, v in data["level_scores"].items()}
        data["calibration"] = None if data.get("calibration") is None else Calibration(**data["calibration"])
        data["population"] = None if data.get("population") is None else Population.from_dict(data["population"])
        data["classes"] = None if data.get("classes") is None else SessionClasses.from_dict(data["classes"])
        return cls(**data)

    def digest(self) -> str:
        """A short content hash that names this session in logs and journals."""
        payload = np.asarray(self.centroids, np.float32).tobytes() + np.asarray(self.profile, np.float32).tobytes()
        if self.calibration is not None:
            payload += np.asarray([self.calibration.cut, self.calibration.scale], np.float64).tobytes()
        if self.population is not None:
            payload += np.asarray(self.population.mean, np.float32).tobytes()
        if self.classes is not None:
            payload += np.asarray(self.classes.centroids, np.float32).tobytes() + bytes(self.classes.kept)
        return hashlib.sha256(payload + str(self.particle_cluster).encode()).hexdigest()[:12]


def fit_session(samples: list[SessionSample], config: EmmaeConfig, patch_px: int) -> Session:
    """Fit the session's clusters, choose the particle cluster and learn the template from ``samples``.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("a session needs at least one micrograph")
    cluster, post = config.cluster, config.postprocess
    diameter = float(np.median([s.diameter_grid_px for s in samples]))
    smoothed = [smooth_latents(s.latents, SESSION_WINDOW) for s in samples]
    darkness = [patch_means(s.image, patch_px, m.shape[:2]) for s, m in zip(samples, smoothed)]
    points = _pooled(smoothed, cluster.session_points, cluster.seed)
    best: tuple[float, int, np.ndarray, list[float]] | None = None
    level_scores = {}
    for k in cluster.levels:
        level = fit(points, k, seed=cluster.seed, max_iter=cluster.max_iter, engine=cluster.engine)
        labels = [assign(m.reshape(-1, m.shape[-1]), level.centroids).reshape(m.shape[:2]) for m in smoothed]
        scores = [cluster_score(labels, darkness, c, diameter / patch_px) for c in range(k)]
        level_scores[k] = [round(s, 6) for s in scores]
        if best is None or max(scores) > best[0]:
            best = (max(scores), int(np.argmax(scores)), to_host(level.centroids), scores)
    top, chosen, centroids, scores = best  # type: ignore[misc]
    runner_up = sorted(scores)[-2] if len(scores) > 1 else 0.0
    confidence = float(1 - runner_up / top) if top > 0 else 0.0
    blobs = [blob_response(s.image, diameter) for s in samples]  # round 0 of the template, and what vetting looks at
    atypical = atypical_peaks(samples, blobs, diameter, patch_px, post.template_top_fraction, post.latent_limit) if post.latent_vetting else None
    profile = learn_profile([s.image for s in samples], diameter, post.template_iterations, post.template_top_fraction, avoid=atypical,
                            responses=blobs)
    calibration, population, found = fit_figure_of_merit(samples, profile, diameter, patch_px, config, atypical)
    classes = None
    if post.session_classes and calibration is not None:
        features = [class_features(sample, peaks.xy, population, patch_px) for sample, peaks in zip(samples, found)] \
            if all(s.classes_image is not None for s in samples) else None  # every peak's, once: to fit the classes and to assign them
        classes = sort_classes(samples, found, features, calibration, config) if features is not None else None
        junk, background = junk_members(found, features, classes)
        unlike = [xy[~b] for xy, b in zip(junk, background)]  # empty classes are the background: the calibration needs them
        if any(len(u) for u in unlike):  # the template and calibration again without the junk
            avoid = junk if atypical is None else [np.concatenate([a, j]) for a, j in zip(atypical, junk)]
            profile = learn_profile([s.image for s in samples], diameter, post.template_iterations, post.template_top_fraction, avoid=avoid,
                                    responses=blobs)
            avoid = unlike if atypical is None else [np.concatenate([a, u]) for a, u in zip(atypical, unlike)]
            calibration, population, _ = fit_figure_of_merit(samples, profile, diameter, patch_px, config, avoid)
    session = Session(centroids=np.asarray(centroids, np.float32), particle_cluster=chosen, cluster_scores=tuple(float(s) for s in scores),
                      level_scores=level_scores, confidence=confidence, ambiguous=confidence < cluster.ambiguous_below,
                      profile=profile, diameter_grid_px=diameter, micrographs=len(samples), calibration=calibration, population=population,
                      classes=classes)
    log.info("session %s from %d micrograph(s): particle cluster %d of k=%d, confidence %.2f, %s", session.digest(), len(samples), chosen, session.k,
             confidence, "no latent population" if population is None else f"latent population of {population.candidates} candidates")
    if session.ambiguous:
        log.warning("session %s: the particle cluster is ambiguous (confidence %.2f < %.2f; scores %s)", session.digest(), confidence,
                    cluster.ambiguous_below, [round(s, 3) for s in scores])
    return session


def atypical_peaks(samples: list[SessionSample], blobs: list[Array], diameter_grid_px: float, patch_px: int, top_fraction: float,
                   limit: float) -> list[np.ndarray] | None:
    """Per sample, the strongest blob peaks ``[M, 2]`` whose latents lie beyond ``limit`` from the population of them all.

    ``blobs``: per sample, its :func:`blob_response` at ``diameter_grid_px``.

    The strongest ``top_fraction`` of each sample's peaks are those the template is
    first learned from: mostly particles, and the darkest junk. None when there are
    too few to fit a population.
    """
    peaks = [strongest(find_peaks(blob, diameter_grid_px / 2), top_fraction) for blob in blobs]
    described = [descriptors(s.latents, xy, patch_px) for s, xy in zip(samples, peaks)]
    population = fit_population(np.concatenate(described), keep=CORE_KEEP, rounds=CORE_ROUNDS)
    if population is None:
        return None
    out = [xy[population.distance2(d) > limit] for xy, d in zip(peaks, described)]
    log.debug("template: %d of the %d strongest blob peaks are atypical", sum(len(o) for o in out), sum(len(p) for p in peaks))
    return out


def fit_figure_of_merit(samples: list[SessionSample], profile: np.ndarray, diameter_grid_px: float, patch_px: int, config: EmmaeConfig,
                        atypical: list[np.ndarray] | None) -> tuple[Calibration | None, Population | None, list]:
    """The session's figure-of-merit calibration, (with ``atypical``) the latent population of its likely particles, and each
    sample's template peaks (:class:`Candidates`, match values as scores).

    The template is matched on every sample micrograph; candidates near an atypical
    peak do not set the calibration; those scoring >= 0.5 then fit the population.
    """
    post = config.postprocess
    values, described, peaks = [], [], []
    for i, sample in enumerate(samples):
        found = match_peaks(sample.image, profile, diameter_grid_px, sample.diameter_grid_px, post.min_distance_diameters * sample.diameter_grid_px)
        if atypical is not None:
            found = far_from(found, atypical[i], sample.diameter_grid_px)
            described.append(descriptors(sample.latents, found.xy, patch_px))
        values.append(found.score)
        peaks.append(found)
    calibration = calibrate(np.concatenate(values))
    if atypical is None or calibration is None:
        return calibration, None, peaks
    likely = [d[calibration.figure_of_merit(v) >= 0.5] for d, v in zip(described, values)]
    return calibration, fit_population(np.concatenate(likely)), peaks


def class_features(sample: SessionSample, xy: np.ndarray, population: Population | None, patch_px: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A sample's candidates' image features ``[N, R + 1]`` and, with a population, their whitened latents ``[N, m]``."""
    image = image_features(sample.classes_image, xy, sample.diameter_grid_px)
    if population is None:
        return image, None
    return image, population.whitened(descriptors(sample.latents, xy, patch_px))


def sort_classes(samples: list[SessionSample], found: list, features: list[tuple[np.ndarray, np.ndarray | None]], calibration: Calibration,
                 config: EmmaeConfig) -> SessionClasses | None:
    """The session's classes of its sample's peaks (``found``, their ``features`` from :func:`class_features`) at figure of merit
    >= ``CANDIDATE_MERIT``; None with too few."""
    images, latents, boxes, merits = [], [], [], []
    for sample, peaks, (image, latent) in zip(samples, found, features):
        merit = calibration.figure_of_merit(peaks.score)
        chosen = merit >= CANDIDATE_MERIT
        merits.append(merit[chosen])
        images.append(image[chosen])
        latents.append(None if latent is None else latent[chosen])
        boxes.append(montage_boxes(sample.classes_image, peaks.xy[chosen], sample.diameter_grid_px))
    whitened = None if latents[0] is None else np.concatenate(latents)
    classes = fit_classes(np.concatenate(images), whitened, np.concatenate(boxes), np.concatenate(merits), config.postprocess.session_classes,
                          config.cluster.seed)
    if classes is not None:
        log.info("session classes: %d of %d kept%s", len(classes.kept), len(classes.classes), "" if classes.judged else " (too faint to judge: all kept)")
    return classes


def junk_members(found: list, features: list[tuple[np.ndarray, np.ndarray | None]] | None,
                 classes: SessionClasses | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sample, the centres ``[M, 2]`` of its template peaks (``found``, with their ``features``) that fall in a junk class, and
    which of them (bool ``[M]``) in an empty one."""
    if classes is None or features is None or len(classes.kept) == len(classes.classes):
        return [np.zeros((0, 2)) for _ in found], [np.zeros(0, bool) for _ in found]
    empty = np.array([c.empty for c in classes.classes])
    junk, background = [], []
    for peaks, (image, latent) in zip(found, features):
        labels = classes.assign(image if latent is None else np.concatenate([image, latent], axis=1))
        dropped = ~classes.kept_mask(labels)
        junk.append(peaks.xy[dropped])
        background.append(empty[labels[dropped]])
    return junk, background


def sample_of(prepared_image_binned: Array, latents: Array, diameter_grid_px: float, config: EmmaeConfig) -> SessionSample:
    """A :class:`SessionSample` from a micrograph's binned grid image and its (valid) latent map."""
    post = config.postprocess
    image = matching_image(prepared_image_binned, diameter_grid_px, post.match_sigma_diameters, post.contrast, post.match_clip_sigma)
    classes = class_image(prepared_image_binned, diameter_grid_px, post.contrast) if post.session_classes else None
    return SessionSample(image=image, latents=latents, diameter_grid_px=diameter_grid_px, classes_image=classes)


def cluster_score(labels: list[Array], darkness: list[Array], cluster: int, diameter_latents: float) -> float:
    """``blobness x darkness`` of one cluster over the sample (0 when it is not darker than the micrograph)."""
    blob, dark = [], []
    for label, mean in zip(labels, darkness):
        member = (label == cluster).astype(np.float32)
        if not bool(member.any()):
            continue
        found = find_peaks(blob_response(-member, diameter_latents), diameter_latents / 2)
        if len(found):
            count = max(1, int(STRONGEST * len(found)))
            blob.append(float(np.mean(np.sort(found.score)[-count:])))
        dark.append(float(to_host(mean[label == cluster]).mean()))
    if not blob or not dark:
        return 0.0
    return float(np.mean(blob) * max(0.0, -float(np.mean(dark))))


def patch_means(image: Array, patch_px: int, shape: tuple[int, int]) -> Array:
    """Mean of ``image`` over each ``patch_px`` square, as a ``shape`` map aligned with the latents (edges reflected)."""
    xp = backend_of(image).xp
    h, w = shape
    padded = xp.pad(image, ((0, max(0, h * patch_px - image.shape[0])), (0, max(0, w * patch_px - image.shape[1]))), mode="reflect")
    return padded[: h * patch_px, : w * patch_px].reshape(h, patch_px, w, patch_px).mean(axis=(1, 3))


def particle_membership(latents: Array, session: Session) -> Array:
    """Boolean ``[h, w]``: the latents (smoothed 2 x 2) that fall in the session's particle cluster."""
    xp = backend_of(latents).xp
    smoothed = smooth_latents(latents, SESSION_WINDOW)
    h, w, dim = smoothed.shape
    return (assign(smoothed.reshape(-1, dim), xp.asarray(session.centroids)) == session.particle_cluster).reshape(h, w)


def particle_share(member: Array, patch_px: int, shape: tuple[int, int], diameter_grid_px: float) -> Array:
    """Share of particle latents (``member [h, w]``) within a particle's area around each grid pixel: ``shape`` [H, W] in [0, 1]."""
    backend = backend_of(member)
    xp = backend.xp
    grid = xp.repeat(xp.repeat(member.astype(np.float32), patch_px, axis=0), patch_px, axis=1)[: shape[0], : shape[1]]
    size = max(1, int(round(diameter_grid_px / np.sqrt(2))))  # a square of the disk's area
    return backend.ndimage.uniform_filter(grid, size=size, mode="reflect")


def _pooled(maps: list[Array], per_map: int, seed: int) -> Array:
    xp = backend_of(maps[0]).xp
    rng = np.random.default_rng(seed)
    parts = []
    for latent in maps:
        flat = latent.reshape(-1, latent.shape[-1])
        take = np.sort(rng.choice(len(flat), min(per_map, len(flat)), replace=False))
        parts.append(flat[xp.asarray(take)])
    return xp.concatenate(parts)
