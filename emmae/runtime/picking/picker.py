"""The picker: prepare -> encode -> pick with a session. The one way every command, the daemon and the benches pick.

* :func:`prepare`: read a micrograph (or take an array) and preprocess it onto the grid;
* :func:`encode`: run the encoder on it (the latent map, on the backend);
* :func:`pick`: cluster, localise and vet its candidates and cut the picks, with a
  :class:`~emmae.runtime.picking.session.Session` the caller fitted (:func:`fit`, on
  encoded micrographs; :class:`~emmae.runtime.picking.builder.SessionBuilder` for a stream);
* :func:`repick`: re-cut saved candidates under another configuration, without encoding.

Nothing here reads folders or writes outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from emmae.backend import to_host
from emmae.config import EmmaeConfig, PostprocessConfig, PreprocessConfig, resolve_diameter_px
from emmae.io.mrc import MrcLayout, read_micrograph
from emmae.io.picks import Picks
from emmae.runtime.kernels.filters import Array
from emmae.runtime.picking.classes import chosen_classes, class_image, image_features
from emmae.runtime.picking.cluster import particle_region, smoothing_window
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.localise import confidence, match_peaks, matching_image
from emmae.runtime.picking.postprocess import Candidates, candidates, picks
from emmae.runtime.picking.preprocess import Preprocessed, preprocess
from emmae.runtime.picking.session import Session, SessionSample, fit_session, particle_membership, particle_share, sample_of
from emmae.runtime.picking.vetting import descriptors

log = logging.getLogger(__name__)


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


def prepare(source: str | Path | np.ndarray, config: EmmaeConfig, encoder: Encoder, name: str | None = None, pixel_size_A: float | None = None,
            layout: MrcLayout | None = None, diameter_px: float | None = None) -> Prepared:
    """Read (a path) or take (an array ``[row, col]``) one micrograph and preprocess it with the bundle's settings.

    ``layout``: the file's header as already parsed and checked against its size (the
    admission's): the file is then read without parsing or sizing it again. ``diameter_px``: the particle diameter in
    its pixels as the admission resolved it from that header (else resolved here).

    Raises:
        MicrographError: the file cannot be read (see :mod:`emmae.io.mrc`).
        ConfigError: no usable particle diameter.
    """
    backend = encoder.backend
    timings: dict[str, float] = {}
    with _timed(timings, "read", lambda: None):
        if isinstance(source, (str, Path)):
            mic = read_micrograph(source, layout=layout)
            image, header_px, label = mic.data, mic.pixel_size_A, name or str(source)
        else:
            image, header_px, label = np.asarray(source, dtype=np.float32), pixel_size_A, name or "array"
    pre = model_preprocess_config(config, encoder)
    diameter_px = resolve_diameter_px(pre, header_px) if diameter_px is None else diameter_px
    with _timed(timings, "preprocess", backend.synchronize):
        grid = preprocess(image, pre, diameter_px, backend)
    pixel = header_px if pre.pixel_size_A is None else pre.pixel_size_A
    return Prepared(label, tuple(image.shape), pixel, diameter_px, grid, timings)


def pick(encoded: Encoded, config: EmmaeConfig, encoder: Encoder, session: Session | None) -> Picks:
    """Cluster, localise and post-process an encoded micrograph with the caller's ``session``.

    ``session``: the clusters, particle choice and template shared by the micrographs
    (:func:`fit`); None only when the configuration needs none (the authors' rule).

    Raises:
        ValueError: no session where the configuration needs one.
    """
    if session is None and needs_session(config):
        raise ValueError("this configuration picks with a session: fit one first (picker.fit)")
    prepared, latents = encoded.prepared, encoded.latents
    backend, grid = encoder.backend, prepared.grid
    timings = dict(prepared.timings_s)
    patch = encoder.bundle.info.patch_px
    valid = valid_latents(latents, grid, patch)
    with _timed(timings, "cluster", backend.synchronize):
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
    """Every peak of the session's template match: ``[N, 6]`` grid x, y, match value, figure of merit, latent distance and class.

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
    described = None
    if session.population is not None and latents is not None and patch_px and len(found):
        described = descriptors(latents, found.xy, patch_px)  # [N, D], for the vetting and the classes
        if post.latent_vetting:
            distance = session.population.distance2(described)
    return np.column_stack([found.xy, found.score, merit, distance, session_class(grid, session, found.xy, config, described)])


def session_class(grid: Preprocessed, session: Session, xy: np.ndarray, config: EmmaeConfig, described: np.ndarray | None) -> np.ndarray:
    """The session class ``[N]`` of each peak at grid ``xy [N, 2]`` (-1 for all when the session has no classes).

    ``described``: the peaks' latent descriptors ``[N, D]`` (None without a latent population).
    """
    classes = session.classes
    if classes is None or not config.postprocess.session_classes or len(xy) == 0 or (classes.latent_dims and described is None):
        return np.full(len(xy), -1.0)
    features = image_features(class_image(grid.binned, grid.diameter_grid_px, config.postprocess.contrast), xy, grid.diameter_grid_px)
    if classes.latent_dims:
        features = np.concatenate([features, session.population.whitened(described)], axis=1)
    return classes.assign(features).astype(np.float64)


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


def fit(encoded: list[Encoded], config: EmmaeConfig, encoder: Encoder) -> Session:
    """Fit the session (:func:`emmae.runtime.picking.session.fit_session`) on already encoded micrographs.

    Raises:
        ValueError: ``encoded`` is empty.
    """
    return fit_session([session_sample(e, config, encoder) for e in encoded], config, encoder.bundle.info.patch_px)


def encode(prepared: Prepared, encoder: Encoder) -> Encoded:
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
        found, typical = scored_candidates(previous.grid_candidates, post, kept_classes(previous.session))
        kept = picks(found.take(np.flatnonzero((found.score >= post.threshold) & typical)), previous.diameter_grid_px, previous.transform.valid_shape, post)
    else:
        found = candidates(previous.region, previous.patch_px, previous.diameter_grid_px, post)
        kept = picks(found, previous.diameter_grid_px, previous.transform.valid_shape, post)
    t = previous.transform
    return replace(
        previous, xy=t.grid_to_input(kept.xy), score=kept.score, candidates_xy=t.grid_to_input(found.xy),
        candidates_score=found.score, timings_s={},
    )


def kept_classes(summary: dict | None) -> tuple[int, ...] | None:
    """The kept classes of a session's summary (:meth:`Session.summary`); None when it sorted none."""
    classes = (summary or {}).get("classes")
    return None if not classes else tuple(int(k) for k in classes["kept"])


def scored_candidates(grid_candidates: np.ndarray, post: PostprocessConfig, kept: tuple[int, ...] | None = None) -> tuple[Candidates, np.ndarray]:
    """Template candidates with their figure of merit, and which of them the latents and the classes let through (bool ``[N]``).

    ``grid_candidates``: ``[N, 6]`` (:func:`template_candidates`), ``[N, 5]`` as saved
    before session classes, or ``[N, 3]`` as saved before figures of merit were
    calibrated per session (scored per micrograph, no vetting). ``kept``: the session's
    particle classes, overruled by ``post.keep_classes`` / ``post.drop_classes``.
    """
    xy = grid_candidates[:, :2]
    if grid_candidates.shape[1] < 5:
        return Candidates(xy, confidence(grid_candidates[:, 2])), np.ones(len(grid_candidates), bool)
    distance = grid_candidates[:, 4]
    typical = ~(distance > post.latent_limit) if post.latent_vetting else np.ones(len(distance), bool)  # NaN: not vetted
    if grid_candidates.shape[1] >= 6 and kept is not None:
        chosen = chosen_classes(kept, post.keep_classes, post.drop_classes)
        label = grid_candidates[:, 5]
        typical &= (label < 0) | np.isin(label, sorted(chosen))
    return Candidates(xy, grid_candidates[:, 3]), typical
