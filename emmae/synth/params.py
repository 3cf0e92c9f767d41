"""Parameters and result type of a synthetic micrograph, with their validation.

Owns :class:`SynthParams` (every physical and layout knob, checked on construction),
:class:`SynthMicrograph` (the image, its particle centres and its junk mask) and the
constant shared by image formation and the junk (``MAX_RMS_CONTRAST``). The image
formation itself is described in the :mod:`emmae.synth` package docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_RMS_CONTRAST = 0.2  #: rms particle contrast cap (see the :mod:`emmae.synth` docstring)


@dataclass(frozen=True)
class SynthParams:
    """Physical and layout parameters of a synthetic micrograph.

    ``n_particles=None`` packs ~35% of the free area; ``border_px=None`` keeps
    centres one radius from the edge. ``snr`` is defined in the :mod:`emmae.synth` docstring.

    Raises:
        ValueError: on construction, for any invalid value; the message names the field.
    """

    shape: tuple[int, int] = (1024, 1024)  # (ny, nx)
    diameter_px: float = 56.0
    pixel_size_A: float = 1.0
    n_particles: int | None = None
    snr: float = 0.05
    defocus_um: float = 1.5
    voltage_kV: float = 300
    amplitude_contrast: float = 0.07
    b_factor_A2: float = 100
    dose_e_per_A2: float = 40
    ice_gradient: float = 0.2
    carbon_edge: bool = False
    carbon_fraction: tuple[float, float] = (0.15, 0.4)  # share of the image the carbon film covers (drawn in this range)
    n_contaminants: int = 0
    contaminant_width_diameters: tuple[float, float] = (1.0, 4.0)  # contaminant width, in particle diameters
    # None: ice chunks (opaque, with phase density); (lo, hi): dark round objects that darken the image
    # lo..hi times as much as the particles do on average (no phase density)
    contaminant_contrast: tuple[float, float] | None = None
    n_aggregates: int = 0  # clumps of 5-10 overlapping particles: junk, not in the truth
    border_px: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def radius_px(self) -> float:
        return self.diameter_px / 2

    @property
    def margin_px(self) -> float:
        """Minimum distance of a centre from the image edge, in pixels."""
        return self.radius_px if self.border_px is None else float(self.border_px)

    @property
    def counts_per_px(self) -> float:
        """Mean expected electron counts per pixel without specimen."""
        return self.dose_e_per_A2 * self.pixel_size_A**2


@dataclass(frozen=True, eq=False)
class SynthMicrograph:
    """A synthetic micrograph: ``image[row, col]`` and its particle centres ``(x, y)``."""

    image: np.ndarray  # float32 (or params.dtype) [ny, nx], expected counts plus noise
    centres_xy: np.ndarray  # float64 [N, 2], x = column, y = row
    params: SynthParams
    junk: np.ndarray | None = None  # bool [ny, nx]: carbon, contaminants and aggregates (None: no junk)


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _validate(p: SynthParams) -> None:
    ints = isinstance(p.shape, tuple | list) and len(p.shape) == 2
    ints = ints and all(isinstance(n, int | np.integer) and n > 0 for n in p.shape)
    require(ints, "shape", f"must be two positive ints (ny, nx), got {p.shape}")
    require(math.isfinite(p.diameter_px) and p.diameter_px > 0, "diameter_px", f"must be > 0, got {p.diameter_px}")
    require(min(p.shape) >= 2 * p.diameter_px, "shape", f"{p.shape} is smaller than 2 diameters of {p.diameter_px} px")
    require(math.isfinite(p.pixel_size_A) and p.pixel_size_A > 0, "pixel_size_A", f"must be > 0, got {p.pixel_size_A}")
    require(p.n_particles is None or p.n_particles >= 0, "n_particles", f"must be >= 0 or None, got {p.n_particles}")
    require(p.n_contaminants >= 0, "n_contaminants", f"must be >= 0, got {p.n_contaminants}")
    require(p.n_aggregates >= 0, "n_aggregates", f"must be >= 0, got {p.n_aggregates}")
    for name in ("carbon_fraction", "contaminant_width_diameters", "contaminant_contrast"):
        pair = getattr(p, name)
        ok = pair is None and name == "contaminant_contrast" or (len(pair) == 2 and 0 < pair[0] <= pair[1] and math.isfinite(pair[1]))
        require(ok, name, f"must be a range (lo, hi) with 0 < lo <= hi, got {pair}")
    require(p.carbon_fraction[1] <= 1, "carbon_fraction", f"must lie in (0, 1], got {p.carbon_fraction}")
    require(p.snr > 0, "snr", f"must be positive, got {p.snr}")
    require(p.defocus_um >= 0, "defocus_um", f"must be >= 0 (underfocus), got {p.defocus_um}")
    require(p.voltage_kV > 0, "voltage_kV", f"must be positive, got {p.voltage_kV}")
    require(0 <= p.amplitude_contrast < 1, "amplitude_contrast", f"must be in [0, 1), got {p.amplitude_contrast}")
    require(p.b_factor_A2 >= 0, "b_factor_A2", f"must be >= 0, got {p.b_factor_A2}")
    require(p.dose_e_per_A2 > 0, "dose_e_per_A2", f"must be positive, got {p.dose_e_per_A2}")
    require(0 <= p.ice_gradient < 1, "ice_gradient", f"must be in [0, 1), got {p.ice_gradient}")
    limit = (min(p.shape) - 1) / 2
    ok = p.border_px is None or 0 <= p.border_px < limit
    require(ok, "border_px", f"must be in [0, {limit}), got {p.border_px}")
    require(p.dtype in ("float32", "float16"), "dtype", f"must be 'float32' or 'float16', got {p.dtype!r}")
