"""Synthetic micrographs: determinism, geometry, contrast, truth and file round trips."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import starfile
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import KDTree
from scipy.spatial.distance import pdist

from emmae.io.mrc import read_micrograph
from emmae.io.star import read_star
from emmae.synth import (
    SynthParams,
    ctf,
    electron_wavelength_A,
    make_micrograph,
    write_micrograph_with_truth,
    write_session,
)

SMALL = SynthParams(shape=(256, 320), diameter_px=32)  # (ny, nx): not square, to catch swaps


def _disk_distance(shape: tuple[int, int], centres_xy: np.ndarray) -> np.ndarray:
    """[ny, nx] distance of every pixel to the nearest centre."""
    rows, cols = np.indices(shape)
    return KDTree(centres_xy).query(np.stack([cols.ravel(), rows.ravel()], axis=1))[0].reshape(shape)


def test_same_seed_same_micrograph_other_seed_differs() -> None:
    a, b, c = make_micrograph(SMALL, 7), make_micrograph(SMALL, 7), make_micrograph(SMALL, 8)
    assert a.image.shape == (256, 320) and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image) and np.array_equal(a.centres_xy, b.centres_xy)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.centres_xy, c.centres_xy)


def test_given_centres_are_returned_exactly_and_copied() -> None:
    centres = np.array([[40.25, 100.5], [41.75, 191.0], [39.5, 283.125]])
    synth = make_micrograph(SynthParams(shape=(384, 512), diameter_px=40), 0, centres_xy=centres)
    assert synth.centres_xy.dtype == np.float64
    assert np.array_equal(synth.centres_xy, centres)
    centres[0, 0] = 300
    assert synth.centres_xy[0, 0] == 40.25


def test_asymmetric_layout_puts_dark_particles_where_asked() -> None:
    """Three particles in a vertical line near the left edge of a wide image."""
    params = SynthParams(shape=(384, 512), diameter_px=40, snr=0.2, ice_gradient=0.0)
    centres = np.array([[40.0, 100.0], [40.0, 192.0], [40.0, 284.0]])
    smooth = gaussian_filter(make_micrograph(params, 3, centres_xy=centres).image, 40 / 6)
    background = np.median(smooth)

    def at(xy: np.ndarray) -> float:
        return float(smooth[int(xy[1]), int(xy[0])])  # image[row, col]

    true = [at(xy) for xy in centres]
    swapped = [at(xy[::-1]) for xy in centres]  # (x, y) read as (row, col)
    mirrored = [at(np.array([511 - xy[0], xy[1]])) for xy in centres]  # the far side
    noise = smooth[:, 200:].std()
    assert max(true) < background - 3 * noise
    assert max(true) < min(swapped + mirrored) - 3 * noise


def test_random_centres_never_overlap_and_respect_the_border() -> None:
    params = SynthParams(shape=(512, 480), diameter_px=32)
    for seed in range(3):
        xy = make_micrograph(params, seed).centres_xy
        assert pdist(xy).min() >= 1.05 * 32
        assert xy.min() >= 16 and xy[:, 0].max() <= 479 - 16 and xy[:, 1].max() <= 511 - 16
        fill = len(xy) * np.pi * 16**2 / ((480 - 32) * (512 - 32))
        assert 0.3 < fill < 0.4  # the default packing, ~35% of the free area


def test_border_and_count_are_honoured() -> None:
    xy = make_micrograph(SynthParams(shape=(512, 512), diameter_px=32, n_particles=12, border_px=100), 1).centres_xy
    assert len(xy) == 12
    assert xy.min() >= 100 and xy.max() <= 511 - 100
    assert pdist(xy).min() >= 1.05 * 32


@pytest.mark.parametrize("ice_gradient", [0.0, 0.2])
def test_particles_are_darker_than_background(ice_gradient: float) -> None:
    params = SynthParams(shape=(512, 512), diameter_px=40, ice_gradient=ice_gradient)  # default SNR 0.05
    for seed in range(3):
        synth = make_micrograph(params, seed)
        image = synth.image - gaussian_filter(synth.image, 80, truncate=2) + synth.image.mean()  # remove the ice ramp
        dist = _disk_distance(params.shape, synth.centres_xy)
        inside, outside = image[dist < 20].mean(), image[dist > 30].mean()
        assert inside < outside - 0.2  # counts; noise on the means is ~0.03
        assert abs(synth.image.mean() - 40) < 2  # dose * pixel^2, not normalised


def test_mean_follows_dose_and_pixel_size() -> None:
    synth = make_micrograph(SynthParams(shape=(256, 256), diameter_px=32, pixel_size_A=1.5, dose_e_per_A2=20), 0)
    assert abs(synth.image.mean() - 20 * 1.5**2) < 0.05 * 45


def test_snr_is_signal_energy_per_disk_area_over_noise_variance() -> None:
    params = SynthParams(shape=(512, 512), diameter_px=40, snr=0.5, ice_gradient=0.0)
    synth = make_micrograph(params, 2)
    image = synth.image.astype(np.float64)
    disk_fraction = len(synth.centres_xy) * np.pi * 20**2 / image.size
    # Poisson noise: variance = mean; the rest of the variance is the particle signal.
    measured = (image.var() - image.mean()) / image.mean() / disk_fraction
    assert measured == pytest.approx(0.5, rel=0.15)


def test_ctf_and_wavelength() -> None:
    assert electron_wavelength_A(300) == pytest.approx(0.01969, abs=1e-5)
    assert electron_wavelength_A(200) == pytest.approx(0.02508, abs=1e-5)
    transfer = ctf(SMALL)
    assert transfer.shape == (256, 320 // 2 + 1) and transfer.dtype == np.float32
    assert transfer[0, 0] == pytest.approx(-SMALL.amplitude_contrast, rel=1e-5)  # negative: protein is dark
    assert np.abs(transfer).max() <= 1


def test_write_micrograph_with_truth_round_trip(tmp_path) -> None:
    params = SynthParams(shape=(256, 320), diameter_px=32, pixel_size_A=1.34)
    synth = make_micrograph(params, 5)
    mrc_path, star_path = write_micrograph_with_truth(tmp_path / "out", "mic_a", synth)
    assert (mrc_path.name, star_path.name) == ("mic_a.mrc", "mic_a_truth.star")
    mic = read_micrograph(mrc_path)
    assert np.array_equal(mic.data, synth.image)
    assert mic.pixel_size_A == pytest.approx(1.34, rel=1e-6)
    block = read_star(star_path)[""]
    assert list(block.columns) == ["rlnCoordinateX", "rlnCoordinateY"]
    np.testing.assert_allclose(block[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), synth.centres_xy, atol=1e-5)
    assert len(starfile.read(star_path)) == len(synth.centres_xy) > 0


def test_write_session(tmp_path) -> None:
    params = SynthParams(shape=(256, 256), diameter_px=32)
    paths = write_session(tmp_path, 3, params, seed=4, prefix="sq")
    assert [p.name for p in paths] == ["sq_00000.mrc", "sq_00001.mrc", "sq_00002.mrc"]
    assert all(p.with_name(p.stem + "_truth.star").exists() for p in paths)
    data = [read_micrograph(p).data for p in paths]
    assert not any(np.array_equal(data[i], data[j]) for i in range(3) for j in range(i + 1, 3))
    again = write_session(tmp_path / "again", 1, params, seed=4, prefix="sq")
    other = write_session(tmp_path / "other", 1, params, seed=5, prefix="sq")
    assert np.array_equal(read_micrograph(again[0]).data, data[0])
    assert not np.array_equal(read_micrograph(other[0]).data, data[0])


def _dark_distance(image: np.ndarray, diameter_px: float) -> tuple[np.ndarray, float]:
    """Distance of each pixel to carbon/contaminant (dark after smoothing), and their area fraction.

    Carbon absorbs 30%, contaminants 85%; particles darken far less than 20% after smoothing.
    """
    smooth = gaussian_filter(image, diameter_px / 4)
    dark = smooth < 0.8 * np.median(smooth)
    return distance_transform_edt(~dark), float(dark.mean())


@pytest.mark.parametrize("seed", range(3))
def test_no_truth_on_carbon_or_contaminants(seed: int) -> None:
    params = SynthParams(shape=(512, 512), diameter_px=32, ice_gradient=0.0, carbon_edge=True, n_contaminants=3)
    synth = make_micrograph(params, seed)
    distance, dark_fraction = _dark_distance(synth.image, 32)
    assert dark_fraction > 0.1  # carbon covers 15-40% of the image
    assert len(synth.centres_xy) > 20
    cols, rows = np.round(synth.centres_xy).astype(int).T
    assert distance[rows, cols].min() >= 12  # particle disks (radius 16) stay clear, less the blur


def test_features_avoid_given_centres() -> None:
    params = SynthParams(shape=(512, 512), diameter_px=32, ice_gradient=0.0, carbon_edge=True, n_contaminants=2)
    centres = np.array([[x, y] for x in (40.0, 100.0) for y in range(40, 480, 60)])
    synth = make_micrograph(params, 0, centres_xy=centres)
    distance, dark_fraction = _dark_distance(synth.image, 32)
    assert dark_fraction > 0.05
    assert distance[centres[:, 1].astype(int), centres[:, 0].astype(int)].min() >= 12


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("diameter_px", 0.0),
        ("diameter_px", -10.0),
        ("pixel_size_A", 0.0),
        ("shape", (100, 300)),  # 100 < 2 diameters of 56
        ("shape", (512.0, 512)),
        ("n_particles", -1),
        ("n_contaminants", -2),
        ("snr", 0.0),
        ("dose_e_per_A2", -1.0),
        ("amplitude_contrast", 1.0),
        ("border_px", -1.0),
        ("dtype", "int16"),
    ],
)
def test_invalid_params_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SynthParams(**{field: value})


@pytest.mark.parametrize(
    "centres", [[[10.0, 300.0]], [[-1.0, 10.0]], [[319.5, 10.0]], [[np.nan, 5.0]], [1.0, 2.0, 3.0]]
)
def test_bad_centres_raise(centres: list) -> None:
    with pytest.raises(ValueError, match="centres_xy"):
        make_micrograph(SMALL, 0, centres_xy=np.array(centres))


def test_too_many_particles_raise() -> None:
    with pytest.raises(ValueError, match="n_particles"):
        make_micrograph(SynthParams(shape=(256, 256), diameter_px=32, n_particles=200), 0)


def test_no_particles() -> None:
    synth = make_micrograph(SynthParams(shape=(256, 256), diameter_px=32, n_particles=0), 0)
    assert synth.centres_xy.shape == (0, 2)
    assert np.isfinite(synth.image).all()
