"""The bundled default model ships in the package and loads with onnxruntime alone."""

from __future__ import annotations

import numpy as np

from emmae.runtime.picking.bundle import default_bundle_path, open_bundle
from tests.conftest import WITHOUT_TORCH, run_python


def test_default_bundle_is_complete():
    path = default_bundle_path()
    assert path.is_file(), f"missing {path}"
    bundle = open_bundle()
    info = bundle.info
    assert info.tile_px == 64 and info.patch_px == 4
    assert info.centroid_array().shape == (4, info.embed_dim)
    assert 0 <= info.particle_cluster < 4
    assert info.standardisation["std"] > 0
    provenance = info.provenance
    assert provenance["epochs"] > 0 and provenance["train"] and provenance["final_valid_loss"] > 0
    latents = bundle.embed(np.full((2, 1, 64, 64), 0.5, np.float32))
    assert latents.shape == (2, 256, info.embed_dim) and np.isfinite(latents).all()


def test_default_bundle_loads_without_torch():
    code = WITHOUT_TORCH + (
        "import numpy as np\n"
        "from emmae.runtime.picking.bundle import open_bundle\n"
        "bundle = open_bundle()\n"
        "out = bundle.embed(np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32))\n"
        "print(out.shape, bundle.providers[0])\n"
    )
    out = run_python(code)
    assert "CPUExecutionProvider" in out and "(3, 256," in out
