from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from emmae import backend as backend_mod
from emmae.backend import CPU, get_array_module, get_backend, to_host
from emmae.errors import BackendError
from tests.conftest import run_python

PACKAGE = Path(backend_mod.__file__).resolve().parent


@pytest.fixture
def fresh(monkeypatch):
    """A clean decision cache and environment for each test."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    backend_mod._select.cache_clear()
    backend_mod._warn_no_gpu.cache_clear()
    yield monkeypatch
    backend_mod._select.cache_clear()
    backend_mod._warn_no_gpu.cache_clear()


def _fake_cupy_without_gpu() -> types.ModuleType:
    cupy = types.ModuleType("cupy")

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    return cupy


def test_cupy_missing_is_silent_cpu(fresh, caplog):
    fresh.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with caplog.at_level(logging.WARNING, logger="emmae.backend"):
        assert get_backend("auto") is CPU
    assert caplog.records == []


def test_cupy_without_gpu_warns_once(fresh, caplog):
    fresh.setitem(sys.modules, "cupy", _fake_cupy_without_gpu())
    with caplog.at_level(logging.WARNING, logger="emmae.backend"):
        assert get_backend("auto") is CPU
        assert get_backend("auto") is CPU
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CuPy is installed but no GPU" in warnings[0].getMessage()
    assert "cudaErrorNoDevice" in warnings[0].getMessage()


def test_gpu_required_but_missing_raises(fresh):
    fresh.setitem(sys.modules, "cupy", _fake_cupy_without_gpu())
    with pytest.raises(BackendError, match="GPU was requested but cannot be used"):
        get_backend("gpu")


def test_cpu_forced_by_config_or_environment(fresh):
    fresh.setitem(sys.modules, "cupy", _fake_cupy_without_gpu())
    assert get_backend("cpu") is CPU
    fresh.setenv(backend_mod.ENV_VAR, "cpu")
    assert get_backend("gpu") is CPU  # the environment wins over a GPU request


def test_bad_environment_value(fresh):
    fresh.setenv(backend_mod.ENV_VAR, "tpu")
    with pytest.raises(BackendError, match="EMMAE_DEVICE='tpu'"):
        get_backend()


def test_array_module_and_host_copy():
    a = np.arange(4.0)
    assert get_array_module(a) is np
    assert to_host(a) is a


def test_only_the_backend_module_imports_cupy():
    pattern = re.compile(r"^\s*(import|from)\s+cupy", re.MULTILINE)
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "backend.py" and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_runtime_never_imports_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import emmae.runtime, emmae.io, emmae.config, emmae.backend\n"
        "for m in pkgutil.walk_packages(emmae.runtime.__path__, 'emmae.runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "for m in pkgutil.walk_packages(emmae.io.__path__, 'emmae.io.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "print('runtime modules:', sum(1 for n in sys.modules if n.startswith('emmae.runtime')))\n"
    )
    assert int(run_python(code).split(":")[1]) >= 4  # the runtime's modules really were imported
