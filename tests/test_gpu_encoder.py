"""The encoder on onnxruntime's CUDA provider, with IO binding: the CPU session's latents, kept on the GPU."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.backend import get_backend
from emmae.errors import BackendError
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")]


@pytest.fixture(scope="module")
def gpu_encoder() -> Encoder:
    try:
        backend = get_backend("gpu")
    except BackendError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    encoder = Encoder.open(backend=backend)
    running = encoder.bundle.session.get_providers()  # what really runs, not what the build offers
    if running[0] != "CUDAExecutionProvider":
        pytest.skip(f"onnxruntime's CUDA provider does not run here (session providers: {running})")
    return encoder


def test_cuda_latents_equal_the_cpu_latents_and_stay_on_the_gpu(gpu_encoder):
    grid = np.random.default_rng(5).uniform(0, 255, (256, 384)).astype(np.float32)  # 4 x 6 tiles
    on_gpu = gpu_encoder.encode(gpu_encoder.backend.asarray(grid))
    assert gpu_encoder.on_device
    assert type(on_gpu).__module__.split(".")[0] == "cupy"
    on_cpu = Encoder.open(precision="fp32").encode(grid)  # the GPU runs the fp32 bundle (precision auto), the CPU int8
    assert on_gpu.shape == on_cpu.shape
    got = on_gpu.get()
    scale = float(np.abs(on_cpu).max())
    assert np.abs(got - on_cpu).max() <= 2e-2 * scale  # TF32 matrix products may run on the GPU
    assert np.corrcoef(got.ravel(), on_cpu.ravel())[0, 1] > 0.9999


def test_cuda_batches_give_the_latents_of_one_run(gpu_encoder):
    grid = gpu_encoder.backend.asarray(np.random.default_rng(6).uniform(0, 255, (192, 320)).astype(np.float32))
    whole = gpu_encoder.encode(grid).get()
    batched = Encoder(gpu_encoder.bundle, gpu_encoder.backend, batch_tiles=4).encode(grid).get()
    np.testing.assert_allclose(batched, whole, rtol=1e-2, atol=5e-3)  # TF32: the GEMM tiling follows the batch
