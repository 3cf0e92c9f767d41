"""Shared fixtures: the backend matrix (CPU always, GPU when present) and the real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emmae.backend import CPU, Backend, get_backend, to_host
from emmae.errors import BackendError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _gpu_backend() -> Backend | None:
    try:
        return get_backend("gpu")
    except BackendError:
        return None


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend test runs on NumPy and, where a GPU is usable, again on CuPy."""
    if request.param == "cpu":
        return CPU
    gpu = _gpu_backend()
    if gpu is None:
        pytest.skip("no usable GPU (CuPy missing or no device)")
    return gpu


@pytest.fixture
def host():
    """Bring any backend array to NumPy."""
    return to_host


@pytest.fixture(scope="session")
def real_micrographs() -> list[tuple[Path, float]]:
    """(path, diameter_px) of every real micrograph in ../shared/data/real; skips when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    found = []
    for dataset in sorted(REAL_DATA.iterdir()):
        manifest = dataset / "manifest.json"
        if not manifest.is_file():
            continue
        diameter = float(json.loads(manifest.read_text())["diameter_px_median"])
        found += [(path, diameter) for path in sorted((dataset / "micrographs").glob("*.mrc"))]
    if not found:
        pytest.skip(f"no micrographs under {REAL_DATA}")
    return found


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


WITHOUT_TORCH = "import sys\nsys.modules['torch'] = None; sys.modules['onnx'] = None  # importing them now fails\n"


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; fail the test with its stderr unless it exits 0. Returns stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout
