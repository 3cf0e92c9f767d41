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


TINY_ARCH = ["--embed-dim", "32", "--depth", "1", "--num-heads", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2"]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (256-px grid) trained one epoch on a synthetic session, exported with its fine-tuning weights; needs torch."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from emmae.export import cli as export_cli
    from emmae.synth import SynthParams, write_session
    from emmae.trainer import cli as train_cli

    root = tmp_path_factory.mktemp("tiny-bundle")
    write_session(root / "first", 2, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=2.0), seed=1)
    args = [str(root / "first"), "--diameter-px", "24", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "1",
            "--out", str(root / "run"), "--set", "preprocess.grid_px=256", *TINY_ARCH]
    assert train_cli.main(args) == 0
    assert export_cli.main([str(root / "run" / "checkpoint.pt"), "--out", str(root / "parent.onnx")]) == 0
    return root / "parent.onnx"
