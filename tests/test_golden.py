"""Golden test: the bundled model picks a synthetic micrograph with known centres,
in micrograph pixels and the right orientation (an asymmetric layout catches any
x/y swap or flip), through the file path and through binning."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from emmae.config import EmmaeConfig
from emmae.io.mrc import write_micrograph
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import encode, fit, pick, prepare
from emmae.synth import SynthParams, make_micrograph

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


def asymmetric_layout(shape: tuple[int, int], diameter: float) -> np.ndarray:
    """A row near the top, a column set in from the left and two particles lower right (x = column).

    No reflection or x/y swap maps the layout onto itself.
    """
    ny, nx = shape
    row = [(x, 1.2 * diameter) for x in np.arange(1.2 * diameter, 0.75 * nx, 1.6 * diameter)]
    column = [(3.5 * diameter, y) for y in np.arange(3.5 * diameter, 0.85 * ny, 2.3 * diameter)]
    corner = [(0.85 * nx, 0.8 * ny), (0.7 * nx, 0.6 * ny)]
    return np.array(row + column + corner)


def matched(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """Fraction of rows of ``a`` with a row of ``b`` within ``tolerance``."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    distance, _ = cKDTree(b).query(a)
    return float(np.mean(distance < tolerance))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.open()


@pytest.mark.parametrize(("shape", "diameter"), [((768, 1280), 56.0), ((1536, 1024), 112.0)])
def test_picks_match_known_centres(encoder, tmp_path, shape, diameter):
    truth = asymmetric_layout(shape, diameter)
    synth = make_micrograph(SynthParams(shape=shape, diameter_px=diameter, pixel_size_A=2.0, snr=0.3), seed=8, centres_xy=truth)
    path = tmp_path / "golden.mrc"
    write_micrograph(path, synth.image, 2.0)
    config = EmmaeConfig.model_validate({"preprocess": {"diameter_A": 2.0 * diameter}})
    encoded = encode(prepare(path, config, encoder), encoder)
    picks = pick(encoded, config, encoder, fit([encoded], config, encoder))
    tolerance = 0.2 * diameter
    assert picks.shape == shape and picks.pixel_size_A == pytest.approx(2.0)
    assert matched(truth, picks.xy, tolerance) >= 0.9  # recall
    assert matched(picks.xy, truth, tolerance) >= 0.9  # precision
    # the same picks read with x and y swapped, or y flipped, do not fit the layout
    ny, nx = shape
    assert matched(truth, picks.xy[:, ::-1], tolerance) < 0.35
    assert matched(truth, np.stack([picks.xy[:, 0], ny - 1 - picks.xy[:, 1]], axis=1), tolerance) < 0.35
    assert matched(truth, np.stack([nx - 1 - picks.xy[:, 0], picks.xy[:, 1]], axis=1), tolerance) < 0.35
