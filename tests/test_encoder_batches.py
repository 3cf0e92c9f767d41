"""The encoder runs a micrograph's tiles in batches of model.batch_tiles, with the same latents."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.picking.encoder import Encoder

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")


def test_batches_give_the_latents_of_one_run(monkeypatch):
    encoder = Encoder.open(threads=1)
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
    encoder.encode(grid)
    assert runs == [15]  # the default, 256, takes them in one run


def test_batch_tiles_must_be_positive():
    encoder = Encoder.open()
    with pytest.raises(ValueError, match="batch_tiles"):
        Encoder(encoder.bundle, encoder.backend, batch_tiles=0)
