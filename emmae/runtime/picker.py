"""``pick_micrograph``: the one call that the batch command, the daemon and the benches share."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from emmae.backend import to_host
from emmae.config import EmmaeConfig, PostprocessConfig, PreprocessConfig, resolve_diameter_px
from emmae.io.coords import GridTransform
from emmae.io.atomic import atomic_path, write_bytes_atomic
from emmae.io.mrc import read_micrograph
from emmae.runtime.cluster import particle_region, smoothing_window
from emmae.runtime.encoder import Encoder
from emmae.runtime.filters import Array
from emmae.runtime.localise import confidence, match_peaks, matching_image
from emmae.runtime.vetting import descriptors
from emmae.runtime.postprocess import Candidates, candidates, picks
from emmae.runtime.preprocess import Preprocessed, preprocess
from emmae.runtime.session import Session, SessionSample, fit_session, particle_membership, particle_share, sample_of

log = logging.getLogger(__name__)


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


@contextmanager
def _timed(timings: dict[str, float], name: str, sync) -> Iterator[None]:
    start = time.perf_counter()
    yield
    sync()
    timings[name] = time.perf_counter() - start


def model_preprocess_config(config: EmmaeConfig, encoder: Encoder) -> PreprocessConfig:
    """The bundle's training preprocessing, with the user's mode, diameter and pixel size."""
    user = config.preprocess
    trained = PreprocessConfig(**encoder.bundle.info.preprocess)
    return trained.model_copy(update={"mode": user.mode, "diameter_px": user.diameter_px, "diameter_A": user.diameter_A, "pixel_size_A": user.pixel_size_A})


@dataclass(frozen=True)
class Prepared:
    """A micrograph read and preprocessed, ready for the encoder (the first pipeline stage)."""

    label: str
    shape: tuple[int, int]  # (ny, nx)
    pixel_size_A: float | None
    diameter_px: float
    grid: Preprocessed
    timings_s: dict[str, float]


def prepare(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None, pixel_size_A: float | None = None) -> Prepared:
    """Read (a path) or take (an array ``[row, col]``) one micrograph and preprocess it with the bundle's settings.

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    backend = encoder.backend
    timings: dict[str, float] = {}
    with _timed(timings, "read", lambda: None):
        if isinstance(source, (str, Path)):
            mic = read_micrograph(source)
            image, header_px, label = mic.data, mic.pixel_size_A, name or str(source)
        else:
            image, header_px, label = np.asarray(source, dtype=np.float32), pixel_size_A, name or "array"
    pre = model_preprocess_config(config, encoder)
    diameter_px = resolve_diameter_px(pre, header_px)
    with _timed(timings, "preprocess", backend.synchronize):
        grid = preprocess(image, pre, diameter_px, backend)
    pixel = header_px if pre.pixel_size_A is None else pre.pixel_size_A
    return Prepared(label, tuple(image.shape), pixel, diameter_px, grid, timings)


def finish(prepared: Prepared, config: EmmaeConfig, encoder: Encoder, latents: Array | None = None, session: Session | None = None) -> Picks:
    """Encode, cluster and post-process a prepared micrograph (the second pipeline stage).

    ``latents``: the micrograph's latent map if it is already encoded (``encoder.encode``
    of ``prepared.grid.image``); the encoder is then not run and no encode time is recorded.
    ``session``: the session's clusters, particle choice and template (:mod:`emmae.runtime.session`);
    without one, a session is fitted on this micrograph alone.
    """
    backend, grid = encoder.backend, prepared.grid
    timings = dict(prepared.timings_s)
    patch = encoder.bundle.info.patch_px
    if latents is None:
        with _timed(timings, "encode", backend.synchronize):
            latents = encoder.encode(grid.image)
    valid = valid_latents(latents, grid, patch)
    with _timed(timings, "cluster", backend.synchronize):
        if session is None and needs_session(config):
            session = fit_session([sample_of(grid.binned, valid, grid.diameter_grid_px, config)], config, patch)
        if config.cluster.selection == "session":
            member = particle_membership(valid, session)
        else:
            window = smoothing_window(grid.diameter_grid_px, patch)
            member = particle_region(valid, encoder.bundle.info.centroid_array(), encoder.bundle.info.particle_cluster, window, config.cluster)
        region = to_host(member)
        share = particle_share(member, patch, grid.transform.valid_shape, grid.diameter_grid_px)
    base = Picks(
        name=prepared.label, shape=prepared.shape, pixel_size_A=prepared.pixel_size_A, diameter_px=prepared.diameter_px,
        xy=np.zeros((0, 2)), score=np.zeros(0), candidates_xy=np.zeros((0, 2)), candidates_score=np.zeros(0), region=region,
        transform=grid.transform, diameter_grid_px=grid.diameter_grid_px, patch_px=patch, timings_s=timings,
        session=None if session is None else session.summary(),
    )
    with _timed(timings, "postprocess", backend.synchronize):
        if config.postprocess.method == "template":
            base = replace(base, grid_candidates=template_candidates(grid, session, share, config, valid, patch))
        result = repick(base, config)
    return replace(result, timings_s=timings)


def valid_latents(latents: Array, grid: Preprocessed, patch_px: int) -> Array:
    """The part of a latent map ``[h, w, D]`` that covers the micrograph (not the padding)."""
    valid = tuple(-(-n // patch_px) for n in grid.transform.valid_shape)
    return latents[: valid[0], : valid[1]]


def template_candidates(grid: Preprocessed, session: Session, share: Array | None, config: EmmaeConfig, latents: Array | None = None,
                        patch_px: int | None = None) -> np.ndarray:
    """Every peak of the session's template match: ``[N, 5]`` grid x, y, match value, figure of merit and latent distance.

    The match of the session's template on the binned micrograph is weighted by
    ``(1 - latent_gate) + latent_gate * share`` (``share``: the particle cluster's
    local share, ``[H, W]``); peaks are at least ``min_distance_diameters`` apart. The
    figure of merit is the session's calibration of the match value (per micrograph
    for a session without one); the latent distance is the peak's squared distance to
    the session's particle population (``latents``: the valid latent map, ``patch_px``
    grid pixels per latent; with ``postprocess.latent_vetting``; NaN otherwise).
    """
    post = config.postprocess
    diameter = grid.diameter_grid_px
    image = matching_image(grid.binned, diameter, post.match_sigma_diameters, post.contrast, post.match_clip_sigma)
    weight = np.float32(1 - post.latent_gate) + np.float32(post.latent_gate) * share if post.latent_gate > 0 else None
    found = match_peaks(image, session.profile, session.diameter_grid_px, diameter, post.min_distance_diameters * diameter, weight)
    merit = session.calibration.figure_of_merit(found.score) if session.calibration is not None else confidence(found.score)
    distance = np.full(len(found), np.nan)
    if post.latent_vetting and session.population is not None and latents is not None and patch_px and len(found):
        distance = session.population.distance2(descriptors(latents, found.xy, patch_px))
    return np.column_stack([found.xy, found.score, merit, distance])


def pick_micrograph(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None,
                    pixel_size_A: float | None = None, session: Session | None = None) -> Picks:
    """Pick one micrograph (a path, or an array ``[row, col]``) with an opened encoder: :func:`prepare` then :func:`finish`.

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    return finish(prepare(source, config, encoder, name, pixel_size_A), config, encoder, session=session)


@dataclass(frozen=True)
class Encoded:
    """A prepared micrograph with its latent map, kept so that a session sample is not encoded twice."""

    prepared: Prepared
    latents: Array


def session_sample_indices(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``count`` items (all of them when there are fewer)."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, wanted)})


def needs_session(config: EmmaeConfig) -> bool:
    return config.cluster.selection == "session" or config.postprocess.method == "template"


def session_sample(encoded: Encoded, config: EmmaeConfig, encoder: Encoder) -> SessionSample:
    """What the session keeps of an encoded micrograph: its matching image and valid latents."""
    grid = encoded.prepared.grid
    return sample_of(grid.binned, valid_latents(encoded.latents, grid, encoder.bundle.info.patch_px), grid.diameter_grid_px, config)


def session_from(encoded: list[Encoded], config: EmmaeConfig, encoder: Encoder) -> Session:
    """Fit the session (:func:`emmae.runtime.session.fit_session`) on already encoded micrographs.

    Raises:
        ValueError: ``encoded`` is empty.
    """
    return fit_session([session_sample(e, config, encoder) for e in encoded], config, encoder.bundle.info.patch_px)


def encode_prepared(prepared: Prepared, encoder: Encoder) -> Encoded:
    """Run the encoder on a prepared micrograph (timed as ``encode``)."""
    timings = dict(prepared.timings_s)
    with _timed(timings, "encode", encoder.backend.synchronize):
        latents = encoder.encode(prepared.grid.image)
    return Encoded(replace(prepared, timings_s=timings), latents)


def repick(previous: Picks, config: EmmaeConfig) -> Picks:
    """New candidates and picks under ``config.postprocess`` (no encoding).

    Template candidates (``previous.grid_candidates``) are re-scored and re-cut;
    otherwise the candidates come from ``previous.region`` (the components method).
    """
    post = config.postprocess
    if previous.grid_candidates is not None:
        found, typical = scored_candidates(previous.grid_candidates, post)
        kept = picks(found.take(np.flatnonzero((found.score >= post.threshold) & typical)), previous.diameter_grid_px, previous.transform.valid_shape, post)
    else:
        found = candidates(previous.region, previous.patch_px, previous.diameter_grid_px, post)
        kept = picks(found, previous.diameter_grid_px, previous.transform.valid_shape, post)
    t = previous.transform
    return replace(
        previous, xy=t.grid_to_input(kept.xy), score=kept.score, candidates_xy=t.grid_to_input(found.xy),
        candidates_score=found.score, timings_s={},
    )


def scored_candidates(grid_candidates: np.ndarray, post: PostprocessConfig) -> tuple[Candidates, np.ndarray]:
    """Template candidates with their figure of merit, and which of them the latents let through (bool ``[N]``).

    ``grid_candidates``: ``[N, 5]`` (:func:`template_candidates`), or ``[N, 3]`` as saved
    before figures of merit were calibrated per session (scored per micrograph, no vetting).
    """
    xy = grid_candidates[:, :2]
    if grid_candidates.shape[1] < 5:
        return Candidates(xy, confidence(grid_candidates[:, 2])), np.ones(len(grid_candidates), bool)
    distance = grid_candidates[:, 4]
    typical = ~(distance > post.latent_limit) if post.latent_vetting else np.ones(len(distance), bool)  # NaN: not vetted
    return Candidates(xy, grid_candidates[:, 3]), typical


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


def load_picks(path: Path, config: EmmaeConfig) -> Picks:
    """Re-create a :class:`Picks` from :func:`save_picks` output, picked under ``config``."""
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        region = saved["region"].astype(bool)
        grid_candidates = saved["grid_candidates"] if "grid_candidates" in saved.files else None
    shapes = [tuple(s) for s in meta["transform"]]
    empty = np.zeros((0, 2))
    base = Picks(
        name=meta["name"], shape=tuple(meta["shape"]), pixel_size_A=meta["pixel_size_A"], diameter_px=meta["diameter_px"],
        xy=empty, score=np.zeros(0), candidates_xy=empty, candidates_score=np.zeros(0), region=region,
        transform=GridTransform(*shapes), diameter_grid_px=meta["diameter_grid_px"], patch_px=meta["patch_px"],
        grid_candidates=grid_candidates, session=meta.get("session"),
    )
    return repick(base, config)


__all__ = ["Candidates", "Encoded", "Picks", "Prepared", "Session", "encode_prepared", "finish", "needs_session", "StreamSession", "session_from", "session_sample_indices", "load_picks", "pick_micrograph", "prepare", "repick", "save_picks"]


class StreamSession:
    """The session of a stream: fitted on its first ``cluster.session_micrographs`` micrographs, then frozen.

    Until then each micrograph is picked with a provisional session fitted on the
    micrographs seen so far (refitted when their count reaches 1, 2, 4, ...), so
    picking never waits; the frozen
    session is written to ``path`` (JSON, atomic) and read back on a restart, so a
    resumed stream keeps its choice. Used by one thread (the pipeline's pick stage).
    """

    def __init__(self, config: EmmaeConfig, encoder: Encoder | None, path: Path | None = None, patch_px: int | None = None) -> None:
        self.config, self.encoder, self.path = config, encoder, path
        self.patch_px = patch_px if patch_px is not None else encoder.bundle.info.patch_px if encoder is not None else None
        self.samples: list[SessionSample] = []
        self.frozen: Session | None = None
        self.provisional: Session | None = None
        if path is not None and path.is_file():
            try:
                self.frozen = Session.from_json(path.read_text())
                log.info("session %s read from %s", self.frozen.digest(), path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s cannot be read (%s); the session is fitted again", path, exc)

    def pick(self, prepared: Prepared) -> Picks:
        """Encode and pick ``prepared`` with the session (provisional until enough micrographs were seen)."""
        if not needs_session(self.config):
            return finish(prepared, self.config, self.encoder)
        encoded = encode_prepared(prepared, self.encoder)
        session = self.frozen if self.frozen is not None else self.add(session_sample(encoded, self.config, self.encoder))
        return finish(encoded.prepared, self.config, self.encoder, encoded.latents, session)

    def learn(self, prepared: Prepared) -> None:
        """Fit the session on ``prepared`` too, without picking it (a session fitted ahead, e.g. for an adapted model)."""
        if self.frozen is not None or not needs_session(self.config):
            return
        self.add(session_sample(encode_prepared(prepared, self.encoder), self.config, self.encoder), refit=True)

    def add(self, sample: SessionSample, refit: bool = False) -> Session | None:
        """Count ``sample`` in; returns the session to pick with now.

        Fixed (and saved) once ``cluster.session_micrographs`` samples are in; until
        then refitted when their count reaches 1, 2, 4, ... (at every sample with ``refit``).
        """
        if self.frozen is not None:
            return self.frozen
        self.samples.append(sample)
        count = len(self.samples)
        if count >= self.config.cluster.session_micrographs:
            self._freeze(self._fit())
        elif refit or count & (count - 1) == 0:
            self.provisional = self._fit()
        return self.frozen or self.provisional

    def _fit(self) -> Session:
        return fit_session(self.samples, self.config, self.patch_px)

    def _freeze(self, session: Session) -> None:
        self.frozen, self.samples = session, []
        log.info("session %s fixed after %d micrographs: %s", session.digest(), session.micrographs, session.summary())
        if self.path is not None:
            try:
                write_bytes_atomic(self.path, session.to_json().encode())
            except OSError as exc:
                log.warning("cannot save the session to %s: %s", self.path, exc)
