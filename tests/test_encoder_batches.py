"""The encoder runs a micrograph's tiles in batches of model.batch_tiles, with the same latents (fp32), and
runs the bundled model as int8 on the CPU (precision auto), close to fp32's latents."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import CPU_BATCH_TILES, Encoder, bundle_path

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


def test_batches_give_the_latents_of_one_run(monkeypatch):
    encoder = Encoder.open(precision="fp32", threads=1)
    assert encoder.bundle.session.get_session_options().intra_op_num_threads == 1
    grid = np.random.default_rng(3).uniform(0, 255, (192, 320)).astype(np.float32)  # 3 x 5 = 15 tiles of 64 px
    whole = encoder.encode(grid)
    runs: list[int] = []
    original = Encoder._run_host

    def counted(self, tiles):
        runs.append(len(tiles))
        return original(self, tiles)

    monkeypatch.setattr(Encoder, "_run_host", counted)
    batched = Encoder(encoder.bundle, encoder.backend, batch_tiles=4).encode(grid)
    assert runs == [4, 4, 4, 3]
    assert batched.shape == whole.shape
    np.testing.assert_allclose(batched, whole, rtol=1e-4, atol=1e-4)
    runs.clear()
    Encoder(encoder.bundle, encoder.backend, batch_tiles=256).encode(grid)
    assert runs == [15]  # a run as large as the micrograph takes them at once
    runs.clear()
    encoder.encode(grid)
    assert CPU_BATCH_TILES == 8 and runs == [8, 7]  # the CPU's default, 8 per run


def test_the_cpu_runs_the_bundled_model_as_int8_close_to_fp32():
    default = Encoder.open()
    assert default.bundle.path == bundle_path(None, "int8") and default.bundle.info.precision == "int8"
    assert bundle_path(None, "auto", gpu=True) == bundle_path(None, "fp32") != bundle_path(None, "auto")
    fp32 = Encoder.open(precision="fp32")
    grid = np.random.default_rng(4).normal(128, 30, (256, 256)).clip(0, 255).astype(np.float32)  # 16 tiles
    quantised, reference = default.encode(grid), fp32.encode(grid)
    error = np.sqrt(np.mean((quantised - reference) ** 2) / np.mean(reference**2))
    cosine = np.sum(quantised * reference, -1) / np.linalg.norm(quantised, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert 0 < error < 0.05 and cosine.min() > 0.99  # not the same numbers, the same directions


def test_the_default_run_size_is_the_providers():
    assert Encoder.open().batch_tiles == CPU_BATCH_TILES  # the CPU provider runs
    assert Encoder.open(batch_tiles=100).batch_tiles == 100


def test_batch_tiles_must_be_positive():
    encoder = Encoder.open()
    with pytest.raises(ValueError, match="batch_tiles"):
        Encoder(encoder.bundle, encoder.backend, batch_tiles=0)
