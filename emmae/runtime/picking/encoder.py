"""The encoder at run time: one onnxruntime session per process, the best provider available.

Providers are tried in the order CUDA -> CPU among those this onnxruntime build offers
(TensorRT is left out: a GPU build offers it even where TensorRT is not installed, then
fails loudly before falling back), and the one that really runs is read back from the
session (an unusable CUDA provider falls back to the CPU silently otherwise). The tiles
of a micrograph go through in runs of at most ``batch_tiles`` (``model.batch_tiles``):
fewer tiles per run hold less memory, more use a GPU better. On the CPU small runs are
also faster (``bench/encode.py --batches``): a run of a few tiles keeps its activations in
the processor's cache, where 256 tiles' (~130 MB per MLP activation) stream from memory.
The latents do not depend on the run size. On the GPU the tiles are
bound from, and the latents written to, device memory (IO binding), so nothing crosses
to the host. The bundled model runs as int8 on the CPU (its weights' matrix products in
8-bit integers: half the time of fp32, the dev datasets' picks within 0.005 F1) and as
fp32 on a GPU (``model.precision``, default ``auto``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from emmae.backend import CPU, Backend, get_backend
from emmae.config import EmmaeConfig
from emmae.runtime.picking.bundle import ModelBundle, default_bundle_path, open_bundle
from emmae.runtime.kernels.filters import Array
from emmae.runtime.kernels.tiles import latent_map, to_tiles

log = logging.getLogger(__name__)

PREFERRED = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_BATCH_TILES = 8  # tiles per run on the CPU, by default
GPU_BATCH_TILES = 256  # ... and on a GPU


def choose_providers(available: list[str], backend: Backend) -> list[str]:
    """The preferred providers this build offers; GPU providers only with a GPU backend."""
    wanted = PREFERRED if backend.is_gpu else ("CPUExecutionProvider",)
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def preload_cuda_libraries(ort: ModuleType) -> None:
    """Load the CUDA and cuDNN libraries of pip's ``nvidia-*`` packages (or PyTorch's) before a CUDA
    session is made: onnxruntime-gpu's provider finds them only this way when they are not on the
    loader's path. A build without ``preload_dlls`` (CPU, older GPU builds) is left alone."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing library: the session then falls back to the CPU, logged below
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


def bundle_path(path: Path | None, precision: str, gpu: bool = False) -> Path:
    """``path``, or the bundled default model of that precision (``auto``: fp32 for a ``gpu``, else int8)."""
    if path is not None:
        return path
    if precision == "auto":
        precision = "fp32" if gpu else "int8"
    default = default_bundle_path()
    return default if precision == "fp32" else default.with_name(f"{default.stem}-{precision}{default.suffix}")


@dataclass(frozen=True)
class Encoder:
    """A loaded bundle and the backend its inputs and outputs live on."""

    bundle: ModelBundle
    backend: Backend
    batch_tiles: int = CPU_BATCH_TILES  # tiles per encoder run

    def __post_init__(self) -> None:
        if self.batch_tiles < 1:
            raise ValueError(f"batch_tiles must be at least 1, got {self.batch_tiles}")

    @classmethod
    def open(cls, path: Path | None = None, precision: str = "auto", backend: Backend = CPU, batch_tiles: int | None = None,
             threads: int | None = None) -> Encoder:
        """Open a bundle (default: the shipped model, ``precision`` ``auto``: int8 on the CPU, fp32 on a GPU) on the
        best provider; ``batch_tiles``: tiles per run (default:
        ``CPU_BATCH_TILES`` or ``GPU_BATCH_TILES``, by the provider that runs); ``threads``: CPU threads of the
        session (default: all cores). Raises ``BundleError``."""
        import onnxruntime as ort

        if backend.is_gpu:
            preload_cuda_libraries(ort)
        providers = choose_providers(ort.get_available_providers(), backend)
        bundle = open_bundle(bundle_path(path, precision, gpu=providers[0] != "CPUExecutionProvider"), providers, threads)
        running = bundle.providers
        log.info("encoder %s runs on %s", bundle.path.name, running[0])
        if backend.is_gpu and running[0] == "CPUExecutionProvider":
            log.warning("onnxruntime has no usable GPU provider: the encoder runs on the CPU")
        if batch_tiles is None:
            batch_tiles = CPU_BATCH_TILES if running[0] == "CPUExecutionProvider" else GPU_BATCH_TILES
        return cls(bundle=bundle, backend=backend, batch_tiles=batch_tiles)

    @classmethod
    def configured(cls, config: EmmaeConfig, threads: int | None = None) -> Encoder:
        """The configured bundle (``model.bundle``, ``model.precision``) on the configured device, ``model.batch_tiles`` per run.

        Raises:
            BundleError: the bundle cannot be opened; BackendError: the GPU was required and cannot be used.
        """
        model = config.model
        return cls.open(model.bundle, model.precision, get_backend(config.backend.device), model.batch_tiles, threads)

    @property
    def on_device(self) -> bool:
        return self.backend.is_gpu and self.bundle.providers[0] != "CPUExecutionProvider"

    def encode(self, grid_image: Array) -> Array:
        """Latent map ``[H/p, W/p, D]`` of a preprocessed grid image (grey levels 0-255), on the backend."""
        info = self.bundle.info
        xp = self.backend.xp
        tiles = to_tiles(grid_image, info.tile_px)
        tiles = (tiles * np.float32(1 / 255) - np.float32(info.standardisation["mean"])) * np.float32(1 / info.standardisation["std"])
        tiles = xp.ascontiguousarray(tiles, dtype=np.float32)
        run = self._run_device if self.on_device else self._run_host
        batches = [run(tiles[i : i + self.batch_tiles]) for i in range(0, len(tiles), self.batch_tiles)]
        latents = batches[0] if len(batches) == 1 else xp.concatenate([self.backend.asarray(b) for b in batches])
        return latent_map(self.backend.asarray(latents), tuple(grid_image.shape), info.patch_px)

    def _run_host(self, tiles: Array) -> np.ndarray:
        """One encoder run on host memory (tiles copied from the GPU if they are there)."""
        session = self.bundle.session
        host = tiles if isinstance(tiles, np.ndarray) else tiles.get()
        return session.run(None, {session.get_inputs()[0].name: host})[0]

    def _run_device(self, tiles: Array) -> Array:
        """IO binding: tiles and latents stay in GPU memory."""
        xp, session, info = self.backend.xp, self.bundle.session, self.bundle.info
        out = xp.empty((tiles.shape[0], (info.tile_px // info.patch_px) ** 2, info.embed_dim), dtype=np.float32)
        binding = session.io_binding()
        device_id = int(xp.cuda.Device().id)
        tiles = xp.ascontiguousarray(tiles)
        binding.bind_input(session.get_inputs()[0].name, "cuda", device_id, np.float32, list(tiles.shape), int(tiles.data.ptr))
        binding.bind_output(session.get_outputs()[0].name, "cuda", device_id, np.float32, list(out.shape), int(out.data.ptr))
        self.backend.synchronize()
        session.run_with_iobinding(binding)
        return out
