"""ONNX export parity, model bundles, and the runtime loading them without torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from emmae.config import PreprocessConfig  # noqa: E402
from emmae.errors import BundleError  # noqa: E402
from emmae.export import cli as export_cli  # noqa: E402
from emmae.export.bundle import write_bundle  # noqa: E402
from emmae.export.onnx import convert_fp16, export_fp32, quantize_int8  # noqa: E402
from emmae.io.mrc import read_micrograph  # noqa: E402
from emmae.runtime.picking.bundle import BundleInfo, open_bundle  # noqa: E402
from emmae.runtime.picking.preprocess import preprocess  # noqa: E402
from emmae.runtime.kernels.tiles import to_tiles  # noqa: E402
from emmae.synth import SynthParams, write_session  # noqa: E402
from emmae.trainer import cli as train_cli  # noqa: E402
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder  # noqa: E402
from tests.conftest import WITHOUT_TORCH, run_python  # noqa: E402

SMALL = MAEArchitecture(embed_dim=48, depth=2, num_heads=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return MaskedAutoencoder(SMALL).eval()


@pytest.fixture(scope="module")
def graphs(mae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    fp32 = export_fp32(mae, folder / "fp32.onnx")
    return {"fp32": fp32, "fp16": convert_fp16(fp32, folder / "fp16.onnx"), "int8": quantize_int8(fp32, folder / "int8.onnx")}


def _info(dim: int = 48, **changes) -> BundleInfo:
    info = dict(
        arch=SMALL.to_dict(), standardisation={"mean": 0.5, "std": 0.1}, centroids=np.eye(4, dim).tolist(),
        particle_cluster=2, particle_cluster_method="prior", preprocess=PreprocessConfig().model_dump(mode="json"),
    )
    info.update(changes)
    return BundleInfo(**info)


def _run(path, tiles):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"tiles": tiles})[0]


def _torch_latents(mae, tiles):
    with torch.no_grad():
        return mae.embed(torch.from_numpy(tiles)).numpy()


def _relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("batch", [1, 5])
def test_fp32_parity_on_random_tiles(mae, graphs, batch):
    tiles = np.random.default_rng(batch).normal(size=(batch, 1, 64, 64)).astype(np.float32)
    assert _relative_error(_run(graphs["fp32"], tiles), _torch_latents(mae, tiles)) < 1e-4


def test_reduced_precision_variants_stay_close(mae, graphs):
    tiles = np.random.default_rng(7).normal(size=(4, 1, 64, 64)).astype(np.float32)
    reference = _torch_latents(mae, tiles)
    assert _relative_error(_run(graphs["fp16"], tiles), reference) < 1e-2
    assert _relative_error(_run(graphs["int8"], tiles), reference) < 0.1


@pytest.mark.real
def test_fp32_parity_on_real_tiles(mae, graphs, real_micrographs):
    path, diameter = real_micrographs[0]
    grid = preprocess(read_micrograph(path).data, PreprocessConfig(), diameter).image
    tiles = ((to_tiles(grid, 64)[::16] / 255 - 0.5) / 0.12).astype(np.float32)  # 16 tiles across the micrograph
    assert _relative_error(_run(graphs["fp32"], tiles), _torch_latents(mae, tiles)) < 1e-4


def test_bundle_round_trip(mae, graphs, tmp_path):
    path = write_bundle(graphs["fp32"], _info(), tmp_path / "model.onnx")
    bundle = open_bundle(path)
    assert bundle.info.particle_cluster == 2 and bundle.info.tile_px == 64 and bundle.info.embed_dim == 48
    assert bundle.providers == ["CPUExecutionProvider"]
    tiles = np.random.default_rng(0).random((3, 1, 64, 64)).astype(np.float32)
    expected = _torch_latents(mae, (tiles - 0.5) / 0.1)
    assert _relative_error(bundle.embed(tiles), expected) < 1e-4


def test_bundle_loads_and_embeds_without_torch(mae, graphs, tmp_path):
    write_bundle(graphs["fp32"], _info(), tmp_path / "model.onnx")
    tiles = np.random.default_rng(1).random((2, 1, 64, 64)).astype(np.float32)
    np.save(tmp_path / "tiles.npy", tiles)
    np.save(tmp_path / "expected.npy", _torch_latents(mae, (tiles - 0.5) / 0.1))
    code = WITHOUT_TORCH + (
        "import numpy as np\n"
        "from emmae.runtime.picking.bundle import open_bundle\n"
        f"folder = {str(tmp_path)!r}\n"
        "got = open_bundle(folder + '/model.onnx').embed(np.load(folder + '/tiles.npy'))\n"
        "want = np.load(folder + '/expected.npy')\n"
        "assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4\n"
        "print('ok', got.shape)\n"
    )
    assert "ok (2, 256, 48)" in run_python(code)


def test_bundle_errors(graphs, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        open_bundle(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a protobuf" * 10)
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        open_bundle(garbage)
    with pytest.raises(BundleError, match="without cryo-EMMAE metadata"):
        open_bundle(graphs["fp32"])
    with pytest.raises(BundleError, match="centroids .* do not match embed_dim"):
        open_bundle(write_bundle(graphs["fp32"], _info(centroids=np.eye(4, 10).tolist()), tmp_path / "bad-dim.onnx"))
    with pytest.raises(BundleError, match="particle cluster 7"):
        open_bundle(write_bundle(graphs["fp32"], _info(particle_cluster=7), tmp_path / "bad-id.onnx"))
    with pytest.raises(ValueError, match="bundle format 99"):
        write_bundle(graphs["fp32"], _info(format_version=99), tmp_path / "future.onnx")
    with pytest.raises(BundleError, match="bundle format 99 is not supported"):
        BundleInfo.from_json(json.dumps({**_info().to_dict(), "format_version": 99}), "x.onnx")
    with pytest.raises(BundleError, match="incomplete bundle metadata"):
        BundleInfo.from_json(json.dumps({"format_version": 1, "arch": {}}), "x.onnx")


def test_train_then_export_command(tmp_path):
    session = tmp_path / "session"
    write_session(session, 2, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=2.0), seed=1)
    run = tmp_path / "run"
    tiny = ["--embed-dim", "32", "--depth", "1", "--num-heads", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2"]
    assert train_cli.main([str(session), "--diameter-px", "24", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "1", "--out", str(run), "--set", "preprocess.grid_px=256", *tiny]) == 0
    reference = sorted(session.glob("*.mrc"))[0]
    out = tmp_path / "model.onnx"
    args = [str(run / "checkpoint.pt"), "--out", str(out), "--precision", "fp32", "fp16", "--reference", str(reference), "--reference-coords", str(reference.with_name(reference.stem + "_truth.star"))]
    assert export_cli.main(args) == 0
    bundle = open_bundle(out)
    assert bundle.info.centroid_array().shape == (4, 32)
    assert bundle.info.particle_cluster_method == "prior"
    assert bundle.info.provenance["epochs"] == 1 and len(bundle.info.provenance["train"]) == 2
    curve = bundle.info.provenance["loss_curve"]
    assert len(curve) == 1 and curve[0]["train_loss"] == bundle.info.provenance["final_train_loss"]
    choices = bundle.info.provenance["particle_cluster_choices"]
    assert len(choices["prior"]["scores"]) == 4 and len(choices["reference"]["scores"]) == 4
    assert bundle.info.preprocess["grid_px"] == 256
    assert open_bundle(tmp_path / "model-fp16.onnx").info.precision == "fp16"
