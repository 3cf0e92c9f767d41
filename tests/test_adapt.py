"""Fine-tuning from a bundle: the weights beside it, emmae-train --init, emmae-adapt and its time budget."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from emmae.errors import BundleError  # noqa: E402
from emmae.trainer.weights import Weights, bundle_weights, read_weights, weights_path, write_weights  # noqa: E402
from emmae.runtime.picking.bundle import open_bundle  # noqa: E402
from emmae.synth import SynthParams, write_session  # noqa: E402
from emmae import adapt as adapt_cli  # noqa: E402
from emmae.trainer import cli as train_cli  # noqa: E402
from tests.conftest import WITHOUT_TORCH  # noqa: E402

@pytest.fixture(scope="module")
def parent(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    folder = tmp_path_factory.mktemp("second")
    write_session(folder, 2, SynthParams(shape=(256, 256), diameter_px=30.0, pixel_size_A=2.0), seed=5)
    return folder


def test_weights_round_trip_and_checks(tmp_path):
    weights = Weights({"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}, {"embed_dim": 8}, {"mean": 0.5, "std": 0.1})
    path = tmp_path / "m.mae.npz"
    digest = write_weights(path, weights)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = read_weights(path, digest)
    assert back.arch == {"embed_dim": 8} and back.standardisation == {"mean": 0.5, "std": 0.1}
    np.testing.assert_array_equal(back.state["a.weight"], weights.state["a.weight"])
    assert back.state["b"].dtype == np.float32
    with pytest.raises(BundleError, match="SHA-256 differs"):
        read_weights(path, "0" * 64)
    (tmp_path / "junk.mae.npz").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a fine-tuning weights file"):
        read_weights(tmp_path / "junk.mae.npz")
    assert weights_path(tmp_path / "model.onnx") == tmp_path / "model.mae.npz"


def test_export_writes_the_full_autoencoder_beside_the_bundle(parent):
    bundle = open_bundle(parent)
    entry = bundle.info.provenance["weights"]
    assert entry["file"] == "parent.mae.npz" and bundle.info.provenance["parent"] is None
    weights = bundle_weights(parent, bundle.info)
    assert any(k.startswith("decoder") for k in weights.state) and any(k.startswith("blocks") for k in weights.state)
    assert weights.standardisation == bundle.info.standardisation


def test_bundle_without_weights_is_refused_with_a_clear_message(parent, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(parent.read_bytes())
    info = open_bundle(lone).info
    with pytest.raises(BundleError, match="no fine-tuning weights"):
        bundle_weights(lone, info)
    (tmp_path / "parent.mae.npz").write_bytes(b"changed")
    with pytest.raises(BundleError, match="SHA-256 differs"):
        bundle_weights(lone, info)


def test_init_keeps_the_architecture(parent, second, tmp_path):
    args = [str(second), "--init", str(parent), "--diameter-px", "30", "--out", str(tmp_path / "run"), "--depth", "3"]
    assert train_cli.main(args) == 2


def test_adapt_fine_tunes_and_names_its_parent(parent, second, tmp_path):
    out = tmp_path / "adapted.onnx"
    progress = tmp_path / "progress.json"
    args = [str(second), "--model", str(parent), "--diameter-px", "30", "--epochs", "2", "--out", str(out), "--progress-file", str(progress)]
    assert adapt_cli.main(args) == 0
    child, mother = open_bundle(out).info, open_bundle(parent).info
    assert child.provenance["parent"]["bundle"] == "parent.onnx"
    assert child.provenance["parent"]["sha256"] == hashlib.sha256(parent.read_bytes()).hexdigest()
    assert child.provenance["train"] == sorted(p.name for p in second.glob("*.mrc"))
    assert child.provenance["epochs"] == 2
    assert child.arch == mother.arch and child.preprocess["grid_px"] == 256  # the parent's architecture and preprocessing
    assert child.standardisation != mother.standardisation  # the new micrographs' own
    before, after = bundle_weights(parent, mother).state, bundle_weights(out, child).state
    assert before.keys() == after.keys()
    moved = [k for k in before if not np.allclose(before[k], after[k])]
    assert any(k.startswith("decoder") for k in moved) and any(k.startswith("blocks") for k in moved)
    assert json.loads(progress.read_text())["stage"] == "done"


def test_adapt_budget_cuts_the_epochs(parent, second, tmp_path):
    out = tmp_path / "quick.onnx"
    args = [str(second), "--model", str(parent), "--diameter-px", "30", "--epochs", "50", "--budget-s", "0.01", "--out", str(out)]
    assert adapt_cli.main(args) == 0
    assert open_bundle(out).info.provenance["epochs"] == 1


def test_adapt_resumes_its_work_folder(parent, second, tmp_path):
    out = tmp_path / "again.onnx"
    args = [str(second), "--model", str(parent), "--diameter-px", "30", "--epochs", "1", "--out", str(out)]
    assert adapt_cli.main(args) == 0
    first = out.with_suffix(".work") / "checkpoint.pt"
    epochs_before = torch.load(first, weights_only=True)["epoch"]
    assert adapt_cli.main([*args[:-4], "--epochs", "2", "--out", str(out)]) == 0
    assert torch.load(first, weights_only=True)["epoch"] == epochs_before + 1 == 2


def test_adapt_without_torch_says_what_to_install(tmp_path):
    code = WITHOUT_TORCH + (
        "import sys\n"
        "from emmae.adapt import main\n"
        f"sys.exit(main(['x.mrc', '--out', {str(tmp_path / 'm.onnx')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "pip install 'cryo-emmae[train]'" in result.stderr and "torch==2.13.0" in result.stderr
