"""One frozen, typed configuration tree for every stage of the picker.

Load it from TOML with :func:`load_config`, override single fields with
``section.field=value`` strings (the CLIs' ``--set``), and save the exact
configuration next to every output with :func:`config_record`.
Lengths carry their unit in the name: ``*_px`` pixels of the *input micrograph*,
``*_A`` Angstrom, ``*_s`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emmae import __version__
from emmae.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class PreprocessConfig(_Section):
    """Section 1 of the method.

    Filter sizes are in pixels of the working grid (``*_grid_px``), so that a model
    sees the same image statistics whatever the camera size. The defaults are the
    reference's sizes (sigma 3 px, 9x9 kernel, 20-px boxes) on a 4096-px micrograph,
    which the grid samples 4x coarser; the ``reference`` mode filters at full
    resolution with the sizes scaled up accordingly."""

    mode: Literal["fast", "reference"] = "fast"
    diameter_px: float | None = Field(None, gt=0, le=8192)
    diameter_A: float | None = Field(None, gt=0, le=10000)
    pixel_size_A: float | None = Field(None, gt=0, le=100)
    grid_px: int = Field(1024, ge=64, le=8192, multiple_of=64)
    tile_px: int = Field(64, ge=8, le=1024)
    gaussian_sigma_grid_px: float = Field(0.75, ge=0, le=100)
    gaussian_radius_grid_px: float = Field(1.0, ge=0, le=400)
    clahe_clip_limit: float = Field(2.0, ge=0, le=256)
    clahe_tiles: int = Field(16, ge=1, le=128)
    box_grid_px: float = Field(5.0, ge=1, le=1000)
    box_passes: int = Field(2, ge=0, le=8)

    @model_validator(mode="after")
    def _one_diameter(self) -> PreprocessConfig:
        if self.diameter_px is not None and self.diameter_A is not None:
            raise ValueError("give diameter_px or diameter_A, not both")
        if self.grid_px % self.tile_px:
            raise ValueError(f"grid_px ({self.grid_px}) must be a multiple of tile_px ({self.tile_px})")
        return self


class ModelConfig(_Section):
    """Which model bundle encodes the tiles (None: the bundled default model)."""

    bundle: Path | None = None
    # the bundled model's precision; auto: int8 on the CPU (half the encoder's time there, the dev
    # datasets' F1 within 0.005 of fp32's: docs/benchmarks.md), fp32 on a GPU
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # tiles per encoder run; None: CPU_BATCH_TILES on the CPU (each run's activations stay in the
    # cache: the same latents, measured faster than bigger runs), GPU_BATCH_TILES on a GPU
    batch_tiles: int | None = Field(None, ge=1, le=65536)


class ClusterConfig(_Section):
    """Section 3 of the method: hierarchical k-means on the latent map."""

    levels: tuple[int, ...] = (3, 4, 5)
    seed: int = Field(0, ge=0)
    centre_margin_fraction: float = Field(0.1, ge=0, lt=0.5)  # of the latent map, each side (25 of 256)
    max_iter: int = Field(100, ge=1, le=10000)
    fit_points: int = Field(4096, ge=64)  # latents sampled to fit each level; all are assigned
    engine: Literal["emmae", "sklearn", "cuml"] = "emmae"  # k-means implementation
    # session: one k-means fitted on latents pooled from several micrographs, the particle
    # cluster chosen label-free once and applied to every micrograph; reference: the
    # authors' per-micrograph hierarchy that follows the train-set particle cluster.
    selection: Literal["session", "reference"] = "session"
    session_micrographs: int = Field(8, ge=1, le=1000)  # micrographs whose latents fit the session
    session_points: int = Field(4000, ge=64)  # latents sampled from each of them
    ambiguous_below: float = Field(0.25, ge=0, le=1)  # confidence under which the choice is warned about

    @model_validator(mode="after")
    def _levels(self) -> ClusterConfig:
        if not self.levels or any(k < 2 or k > 64 for k in self.levels):
            raise ValueError(f"levels must be a non-empty list of k in [2, 64], got {list(self.levels)}")
        return self


class PostprocessConfig(_Section):
    """Section 4 of the method: threshold, components, suppression, border."""

    area_fraction: float = Field(0.04, gt=0, lt=1)
    threshold_levels: int = Field(30, ge=2, le=1000)
    min_distance_diameters: float = Field(0.5, ge=0, le=10)
    clump_diameters: float = Field(0.8, ge=0, le=10)  # picks closer than this overlap; clump_size of them linked are an aggregate
    clump_size: int = Field(0, ge=0, le=1000)  # 0: aggregates are not dropped
    border_diameters: float = Field(1 / 1.5, ge=0, le=10)
    min_score: float = Field(0.0, ge=0)  # kept picks need at least this figure of merit (component area / particle disk)
    keep_fraction: float = Field(1.0, gt=0, le=1)  # then only this top fraction by score is kept ("keep the top N %")
    # template: peaks of the session's particle template matched on the binned micrograph
    # (figure of merit: a 0-1 confidence); components: the reference's area prior and
    # connected components of the particle cluster (figure of merit: area / particle disk).
    method: Literal["template", "components"] = "template"
    threshold: float = Field(0.5, ge=0, le=1)  # template: candidates whose confidence reaches this are picks
    contrast: Literal["dark", "bright"] = "dark"  # particles darker than the ice (raw contrast) or lighter
    match_sigma_diameters: float = Field(0.035, ge=0, le=1)  # Gaussian smoothing before matching
    match_clip_sigma: float = Field(3.0, ge=0, le=100)  # clip the matched image at this many robust SDs (0: off)
    template_iterations: int = Field(30, ge=0, le=100)  # most template re-estimations (stops once the profile settles)
    template_top_fraction: float = Field(0.3, gt=0, le=1)  # share of the peaks that estimates the template
    latent_gate: float = Field(0.0, ge=0, le=1)  # weight of the particle cluster's local share in the match score
    # latents vet the template's candidates: one whose latent descriptor lies beyond latent_limit
    # (squared Mahalanobis distance in the session population's 8 principal axes) is not a pick,
    # and atypical blobs never shape the session's template (emmae.runtime.picking.vetting)
    latent_vetting: bool = True
    latent_limit: float = Field(40.0, gt=0, le=1e6)
    # session classes (emmae.runtime.picking.classes): the session's candidates sorted into this many
    # classes (0: off), each judged particle or junk; a candidate of a junk class is never a pick.
    # keep_classes / drop_classes overrule the session's choice by class number (emmae-classes.png)
    session_classes: int = Field(12, ge=0, le=64)
    keep_classes: tuple[int, ...] = ()
    drop_classes: tuple[int, ...] = ()


class OutputConfig(_Section):
    """What is written, and the explicit coordinate switches users otherwise apply by hand."""

    formats: tuple[Literal["star", "box", "cbox"], ...] = ("star",)
    flip_y: bool = False
    coordinate_scale: float = Field(1.0, gt=0, le=64)
    strip_prefix: str = ""
    add_prefix: str = ""
    project_root: Path | None = None
    preview: bool = False  # <stem>_preview.png: the micrograph with its picks circled
    # particles.star's optics block: None takes a micrographs STAR's own, else RELION's import defaults (300 kV, 2.7 mm, 0.1)
    voltage_kV: float | None = Field(None, gt=0, le=3000)
    spherical_aberration_mm: float | None = Field(None, ge=0, le=100)
    amplitude_contrast: float | None = Field(None, ge=0, le=1)


class StreamConfig(_Section):
    """The streaming daemon: what to watch and when a file counts as complete."""

    patterns: tuple[str, ...] = ("*.mrc",)
    recursive: bool = True
    settle_s: float = Field(5.0, ge=0, le=3600)
    stale_after_s: float = Field(180.0, gt=0, le=86400)  # an incomplete file unchanged this long is recorded as failed
    poll_interval_s: float = Field(2.0, gt=0, le=3600)
    poll: Literal["auto", "always"] = "auto"  # always: polling only, no file-system observer
    order: Literal["oldest", "newest"] = "oldest"
    queue_depth: int = Field(4, ge=1, le=1024)
    repick_provisional: bool = True  # once the session is fixed, pick again what provisional sessions picked
    max_attempts: int = Field(3, ge=1, le=100)  # a micrograph in hand when the daemon died this many times is failed
    adapt_after: int = Field(0, ge=0, le=100000)  # fine-tune the model on the first N picked micrographs (0: never)
    adapt_then: Literal["repick", "mark"] = "repick"  # what the old model picked: picked again with the adapted one, or only marked
    adapt_epochs: int = Field(5, ge=1, le=1000)  # most fine-tuning epochs
    adapt_budget_s: float = Field(600.0, ge=0, le=86400)  # fine-tuning time budget (0: no limit)


class BackendConfig(_Section):
    """Compute device. ``EMMAE_DEVICE=cpu`` in the environment also forces the CPU."""

    device: Literal["auto", "cpu", "gpu"] = "auto"


class EmmaeConfig(_Section):
    """The whole configuration tree."""

    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    cluster: ClusterConfig = ClusterConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    output: OutputConfig = OutputConfig()
    stream: StreamConfig = StreamConfig()
    backend: BackendConfig = BackendConfig()


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> EmmaeConfig:
    """Build the configuration from an optional TOML file and ``section.field=value`` overrides.

    Override values are parsed as TOML values (``3``, ``0.5``, ``true``, ``[3, 4]``,
    ``"text"``); anything that is not valid TOML is taken as a plain string.

    Raises:
        ConfigError: unreadable or invalid TOML, an unknown field, or a value out of
            range (the message names the field and the allowed values).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for item in overrides:
        apply_override(data, item)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> EmmaeConfig:
    """Validate a plain dict into an :class:`EmmaeConfig`.

    Raises:
        ConfigError: with one line per invalid field, naming it and the allowed values.
    """
    try:
        return EmmaeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(err) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``data[section][field]`` from one ``section.field=value`` override (the value parsed as TOML, else a string). Raises ConfigError."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: {parts[0]!r} is not a section")
    section[parts[1]] = value


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    allowed = _allowed_values(err["loc"])
    got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
    suffix = f"; allowed: {allowed}" if allowed else ""
    return f"{loc or '<root>'}: {err['msg']}{got}{suffix}"


def _allowed_values(loc: tuple[Any, ...]) -> str:
    """The allowed range or choices of the field at ``loc``, as text ('' if unknown)."""
    model: type[BaseModel] = EmmaeConfig
    info = None
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return ""
        info = model.model_fields[part]
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            model = info.annotation
    if info is None:
        return ""
    choices = _literal_values(info.annotation)
    if choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    bounds = []
    for meta in info.metadata:
        for name, op in (("Gt", ">"), ("Ge", ">="), ("Lt", "<"), ("Le", "<=")):
            if isinstance(meta, getattr(at, name)):
                bounds.append(f"{op} {getattr(meta, name.lower())}")
        if isinstance(meta, at.MultipleOf):
            bounds.append(f"multiple of {meta.multiple_of}")
    return ", ".join(bounds)


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and repeatable ``--set section.field=value`` to a CLI parser."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="SECTION.FIELD=VALUE",
        help="override one configuration field (repeatable), e.g. --set preprocess.mode=reference",
    )


def config_from_args(args: argparse.Namespace, switches: dict[tuple[str, str], Any] | None = None) -> EmmaeConfig:
    """The configuration named by :func:`add_config_arguments`' options, then a command's own
    switches (``(section, field) -> value``; None leaves the field alone). Raises :class:`ConfigError`."""
    config = load_config(args.config, args.overrides or ())
    updates = {key: value for key, value in (switches or {}).items() if value is not None}
    if not updates:
        return config
    data = config.model_dump(mode="json")
    for (section, field), value in updates.items():
        data[section][field] = value
    return validate_config(data)


def resolve_diameter_px(config: PreprocessConfig, header_pixel_size_A: float | None = None) -> float:
    """The particle diameter in pixels of the input micrograph.

    ``diameter_px`` is used as given. ``diameter_A`` is divided by the pixel size:
    ``config.pixel_size_A`` when set (it overrides the header), else the MRC header's.

    Raises:
        ConfigError: no diameter at all, or a diameter in Angstrom with no pixel size.
    """
    if config.diameter_px is not None:
        return float(config.diameter_px)
    if config.diameter_A is None:
        raise ConfigError("no particle diameter: set preprocess.diameter_px or preprocess.diameter_A")
    pixel_size = config.pixel_size_A or header_pixel_size_A
    if pixel_size is None or not math.isfinite(pixel_size) or pixel_size <= 0:
        raise ConfigError(
            f"preprocess.diameter_A={config.diameter_A} needs a pixel size: the micrograph header has none, "
            "so set preprocess.pixel_size_A (or give preprocess.diameter_px)"
        )
    return float(config.diameter_A) / float(pixel_size)


def config_record(config: EmmaeConfig, argv: Iterable[str] | None = None) -> dict[str, Any]:
    """A JSON-ready record of the configuration, the package version and the command line."""
    return {
        "emmae_version": __version__,
        "argv": list(sys.argv if argv is None else argv),
        "config": config.model_dump(mode="json"),
    }


def config_hash(config: EmmaeConfig) -> str:
    """A short hash of what decides a micrograph's picks (every section but the daemon's own and the device)."""
    data = config.model_dump(mode="json", exclude={"stream", "backend"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
