"""CPU or GPU: the one module that imports CuPy and decides where arrays live.

Array code elsewhere is written once against an ``xp`` namespace (NumPy or CuPy,
CuPy's ``get_array_module`` idiom) and asks this module for it. The decision is
made once per requested device and cached:

* ``EMMAE_DEVICE=cpu`` in the environment, or ``backend.device = "cpu"`` in the
  configuration, forces NumPy.
* CuPy not installed: NumPy, silently (the normal CPU install).
* CuPy installed but no usable GPU: NumPy, with one logged warning.
* ``device = "gpu"`` (or ``EMMAE_DEVICE=gpu``) with no usable GPU raises
  :class:`~emmae.errors.BackendError`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import scipy.fft
import scipy.ndimage

from emmae.errors import BackendError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]
ENV_VAR = "EMMAE_DEVICE"


@dataclass(frozen=True)
class Backend:
    """An array namespace (``xp``), its ``ndimage`` and where the arrays live."""

    name: Literal["numpy", "cupy"]
    xp: ModuleType
    ndimage: ModuleType
    fft: ModuleType
    device_name: str

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """``array`` on this backend's device (no copy when it is already there)."""
        return self.xp.asarray(array, dtype=dtype)

    def fft_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``self.fft`` transforms (all CPU cores for SciPy)."""
        return {} if self.is_gpu else {"workers": -1}

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on the CPU."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


CPU = Backend(name="numpy", xp=np, ndimage=scipy.ndimage, fft=scipy.fft, device_name="cpu")


def get_backend(device: Device = "auto") -> Backend:
    """The backend for ``device``, combined with the ``EMMAE_DEVICE`` environment variable.

    Raises:
        BackendError: the GPU was required but CuPy or a usable GPU is missing, or
            ``EMMAE_DEVICE`` holds an unknown value.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if env not in ("auto", "cpu", "gpu"):
        raise BackendError(f"{ENV_VAR}={env!r}: expected one of 'auto', 'cpu', 'gpu'")
    if "cpu" in (env, device):
        return CPU
    return _select("gpu" if "gpu" in (env, device) else "auto")


@functools.cache
def _select(device: Literal["auto", "gpu"]) -> Backend:
    cupy, reason = _probe_cupy()
    if cupy is not None:
        import cupyx.scipy.fft as cu_fft
        import cupyx.scipy.ndimage as cu_ndimage

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        log.info("using the GPU: %s", name)
        return Backend(name="cupy", xp=cupy, ndimage=cu_ndimage, fft=cu_fft, device_name=name)
    if device == "gpu":
        raise BackendError(f"the GPU was requested but cannot be used: {reason}")
    if reason != "not installed":
        _warn_no_gpu(reason)
    return CPU


@functools.cache
def _warn_no_gpu(reason: str) -> None:
    log.warning("CuPy is installed but no GPU can be used (%s); running on the CPU", reason)


def _probe_cupy() -> tuple[ModuleType | None, str]:
    """(cupy, "") when CuPy imports and sees a GPU, else (None, why not)."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # a broken CUDA install can raise anything at import
        return None, f"import failed: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return None, "no CUDA device"
        cupy.zeros(1).sum()  # a real allocation and kernel launch
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return cupy, ""


def cuml_kmeans() -> type:
    """cuML's ``KMeans`` class (GPU k-means). Raises :class:`BackendError` when cuML is missing."""
    try:
        return importlib.import_module("cuml.cluster").KMeans
    except ImportError as exc:
        raise BackendError(f"k-means engine 'cuml' needs cuML: {exc}") from None


def get_array_module(array: Any) -> ModuleType:
    """``numpy`` or ``cupy``, whichever owns ``array`` (CuPy is not imported for NumPy arrays)."""
    if type(array).__module__.split(".")[0] == "cupy":
        return importlib.import_module("cupy")
    return np


def backend_of(array: Any) -> Backend:
    """The :class:`Backend` that owns ``array``."""
    return CPU if get_array_module(array) is np else _select("gpu")


def to_host(array: Any) -> np.ndarray:
    """``array`` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    if get_array_module(array) is np:
        return np.asarray(array)
    return array.get()


def check_threads(threads: int | None) -> None:
    """Raises ValueError for a thread count below 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")


def limit_cpu_threads(threads: int | None) -> None:
    """Limit OpenCV's threads (preprocessing); the encoder takes the same count when it is opened."""
    if threads is None:
        return
    check_threads(threads)
    import cv2

    cv2.setNumThreads(threads)


def cpu_threads() -> int:
    """Threads one process's CPU work may use: OpenCV's count (set by :func:`limit_cpu_threads`; all cores by default)."""
    import cv2

    return max(1, int(cv2.getNumThreads()))
