"""Image formation after the density: optics (CTF, phase contrast at the requested SNR) and exposure.

Owns the relativistic electron wavelength, the CTF with its B-factor envelope, the
contrast scaling that sets the SNR, the ice-thickness background, and shot noise and
Gaussian fields drawn over a fixed number of row blocks on threads (so results do not
depend on the number of CPUs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft

from emmae.synth.params import MAX_RMS_CONTRAST, SynthParams

CS_A = 2.7e7  #: spherical aberration, 2.7 mm in Angstrom
NOISE_BLOCKS = 16  #: row blocks of random numbers; fixed so results never depend on CPUs


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Angstrom (300 kV -> 0.0197)."""
    volts = voltage_kV * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.97848e-6 * volts))


def ctf(p: SynthParams) -> np.ndarray:
    """[ny, nx // 2 + 1] float32 CTF with B-factor envelope, on the ``rfft2`` grid."""
    ny, nx = p.shape
    lam, defocus_A = electron_wavelength_A(p.voltage_kV), p.defocus_um * 1e4
    ky = (scipy.fft.fftfreq(ny) / p.pixel_size_A).astype(np.float32) ** 2
    kx = (scipy.fft.rfftfreq(nx) / p.pixel_size_A).astype(np.float32) ** 2
    k2 = ky[:, None] + kx  # [ny, nx//2+1] in 1/A^2
    chi = k2 * np.float32(-np.pi / 2 * CS_A * lam**3)
    chi += np.float32(np.pi * lam * defocus_A)
    chi *= k2
    chi += np.float32(math.asin(p.amplitude_contrast))  # sqrt(1-A^2) sin x + A cos x = sin(x + asin A)
    out = np.sin(chi, out=chi)
    k2 *= np.float32(-p.b_factor_A2 / 4)
    out *= np.exp(k2, out=k2)
    return np.negative(out, out=out)


def _energy(spectrum: np.ndarray, nx: int) -> float:
    """Sum of squares of ``irfft2(spectrum)`` (Parseval on the half spectrum)."""
    total = 2 * np.vdot(spectrum, spectrum).real - np.vdot(spectrum[:, 0], spectrum[:, 0]).real
    if nx % 2 == 0:
        total -= np.vdot(spectrum[:, -1], spectrum[:, -1]).real
    return float(total) / (spectrum.shape[0] * nx)


def phase_contrast(p: SynthParams, particles: np.ndarray, n: int, features: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Relative phase contrast [ny, nx] float32 and the noise scale giving ``p.snr``."""
    transfer = ctf(p)
    spectrum = scipy.fft.rfft2(particles, workers=-1)
    spectrum *= transfer
    counts = p.counts_per_px
    rms = min(math.sqrt(p.snr / counts), MAX_RMS_CONTRAST)
    energy = _energy(spectrum, p.shape[1])
    # Particle signal energy per pixel of disk area -> rms**2; without particles unit density -> rms.
    scale = rms / math.sqrt(energy / (n * np.pi * p.radius_px**2)) if n and energy > 0 else rms
    if features is not None:
        extra = scipy.fft.rfft2(features, workers=-1)
        extra *= transfer
        spectrum += extra
    spectrum *= np.float32(scale)
    contrast = scipy.fft.irfft2(spectrum, s=p.shape, workers=-1, overwrite_x=True)
    return contrast, rms * math.sqrt(counts / p.snr)


def ice_background(p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """[ny, nx] float32 expected counts through the ice: ``counts * (1 - thickness change)``.

    The thickness change is a ramp spanning ``ice_gradient`` in a random direction
    plus three separable cosines of <= 1.5 cycles across the image (rank-5 product).
    """
    ny, nx = p.shape
    y, x = np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2
    theta = rng.uniform(0, 2 * np.pi)
    span = (nx - 1) * abs(math.cos(theta)) + (ny - 1) * abs(math.sin(theta))
    g, counts = p.ice_gradient, p.counts_per_px
    cols = [counts * (1 - g * math.sin(theta) * y / span), np.ones(ny)]  # F [ny, K]
    rows = [np.ones(nx), -counts * g * math.cos(theta) * x / span]  # G [K, nx]
    for amp, fy, fx, py, px in rng.uniform((0, 0, 0, 0, 0), (0.15, 1.5, 1.5, 2 * np.pi, 2 * np.pi), (3, 5)):
        cols.append(-counts * g * amp * np.cos(2 * np.pi * fy * y / ny + py))
        rows.append(np.cos(2 * np.pi * fx * x / nx + px))
    return np.stack(cols, axis=1).astype(np.float32) @ np.stack(rows).astype(np.float32)


def gaussian_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """[ny, nx] float32 standard normal."""
    out = np.empty(shape, dtype=np.float32)
    _by_row_blocks(rng, out, lambda gen, block: gen.standard_normal(out=block, dtype=np.float32))
    return out


def expose(expected: np.ndarray, rng: np.random.Generator, noise_scale: float) -> np.ndarray:
    """Shot noise in place: ``expected + noise_scale * sqrt(expected) * N(0, 1)``; expected >= 0 first."""

    def block_noise(gen: np.random.Generator, block: np.ndarray) -> None:
        noise = gen.standard_normal(block.shape, dtype=np.float32)
        np.maximum(block, 0, out=block)
        noise *= np.sqrt(block)
        if noise_scale != 1:
            noise *= np.float32(noise_scale)
        block += noise

    _by_row_blocks(rng, expected, block_noise)
    return expected


def _by_row_blocks(
    rng: np.random.Generator, image: np.ndarray, task: Callable[[np.random.Generator, np.ndarray], object]
) -> None:
    """Run ``task(generator, rows)`` over fixed row blocks of ``image`` on threads.

    Each block has its own generator spawned from ``rng``; the block count is fixed,
    so the result does not depend on the number of CPUs.
    """
    bounds = np.linspace(0, image.shape[0], NOISE_BLOCKS + 1).astype(int).tolist()
    gens = rng.spawn(NOISE_BLOCKS)
    with ThreadPoolExecutor(max_workers=min(NOISE_BLOCKS, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda i: task(gens[i], image[bounds[i] : bounds[i + 1]]), range(NOISE_BLOCKS)))
