"""The prepared GPU training run (bench/gpu_train.py, emmae.trainer.pack/packer/multi, bench/gpu_train_import.py), on the CPU.

A tiny synthetic data folder (three datasets, train and valid splits) goes the whole way:
pack -> a few training steps (in a fresh interpreter without mrcfile, starfile, pydantic
or watchdog, as on the GPU machine) -> fp16 weights and the loss log -> bundles through
the export path. The pack builder is also checked on one real micrograph per dataset.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from emmae.config import PreprocessConfig  # noqa: E402
from emmae.synth import SynthParams, write_session  # noqa: E402
from emmae.trainer.data import MicrographItem, cached_grid_image  # noqa: E402
from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder  # noqa: E402
from emmae.trainer.multi import (  # noqa: E402
    Crops,
    MultiSettings,
    SCHEDULE_UNITS,
    plan_models,
    read_weights,
    train_models,
)
from emmae.trainer.optim import learning_rate  # noqa: E402
from emmae.trainer.pack import Pack, PackedMicrograph, PackError, read_pack  # noqa: E402
from emmae.trainer.packer import build_pack  # noqa: E402
from tests.conftest import REAL_DATA, run_python  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import generalise_models  # noqa: E402
import gpu_train  # noqa: E402
import gpu_train_import  # noqa: E402

DATASETS = ("EMPIAR-A", "EMPIAR-B", "EMPIAR-C")
BLOCKED = "import sys\nfor name in ('mrcfile', 'starfile', 'pydantic', 'watchdog'):\n    sys.modules[name] = None  # importing them now fails\n"
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 1, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
SMOKE_ARCH = gpu_train.BUNDLED_ARCH | TINY  # the bundled default's tiles and patches, narrower and shallower: seconds on a CPU


def _pack(images: list[np.ndarray], valid: list[tuple[int, int]], datasets: list[str]) -> Pack:
    g = images[0].shape[0]
    entries = [PackedMicrograph(f"m{i}", d, "train", 20.0, (g, g), v, f"{d}/micrographs/m{i}.mrc") for i, (v, d) in enumerate(zip(valid, datasets))]
    return Pack(images=np.stack(images).astype(np.uint8), micrographs=entries)


def test_crops_are_windows_inside_the_content_turned_by_all_eight_symmetries():
    image = np.arange(256).reshape(16, 16)  # every grey level once: a crop's smallest value is its window's corner
    pack = _pack([image], [(12, 16)], ["A"])
    crops = Crops(pack, 4, torch.device("cpu")).sample(torch.tensor([0]), 4000, torch.Generator().manual_seed(1)).numpy()
    assert crops.shape == (4000, 4, 4) and crops.dtype == np.uint8
    corners, symmetries = set(), set()
    for crop in crops:
        r, c = divmod(int(crop.min()), 16)
        window = image[r : r + 4, c : c + 4]
        turns = [np.rot90(window, k) for k in range(4)] + [np.rot90(window.T, k) for k in range(4)]
        matches = [k for k, t in enumerate(turns) if np.array_equal(t, crop)]
        assert len(matches) == 1, f"crop at {(r, c)} is no symmetry of its window"
        corners.add((r, c))
        symmetries.add(matches[0])
    assert symmetries == set(range(8))
    assert {r for r, _ in corners} == set(range(9))  # rows 0..8: the crop stays inside the 12 content rows
    assert {c for _, c in corners} == set(range(13))


def test_models_are_the_generalise_folds_and_all(tmp_path):
    for d in DATASETS:
        (tmp_path / d).mkdir()
        (tmp_path / d / "manifest.json").write_text(json.dumps({"micrographs": {}}))
    pack = _pack([np.zeros((64, 64))] * 4, [(64, 64)] * 4, ["EMPIAR-A", "EMPIAR-B", "EMPIAR-C", "EMPIAR-C"])
    plans = plan_models(pack)
    assert [p.name for p in plans] == [f.name for f in generalise_models.folds(tmp_path, include_all=True)]
    assert [(p.datasets, p.share) for p in plans] == [(("EMPIAR-B", "EMPIAR-C"), 1), (("EMPIAR-A", "EMPIAR-C"), 1), (("EMPIAR-A", "EMPIAR-B"), 1),
                                                     (DATASETS, 2)]
    assert pack.indices(("EMPIAR-A", "EMPIAR-B")) == [0, 1]
    with pytest.raises(PackError, match="no model"):
        plan_models(pack, ["without-EMPIAR-D"])


def test_schedule_warms_up_then_ends_annealed():
    schedule = MultiSettings().schedule()
    assert learning_rate(schedule, 0) == 0
    assert learning_rate(schedule, 0.05 * SCHEDULE_UNITS) == pytest.approx(2e-3)  # 2.5e-4 x 1024 / 128
    assert learning_rate(schedule, SCHEDULE_UNITS) == pytest.approx(1e-6)


def test_gpu_entry_trains_the_bundled_default_architecture():
    from emmae.runtime.picking.bundle import open_bundle

    assert gpu_train.BUNDLED_ARCH == open_bundle().info.arch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three datasets of 256-px micrographs: two train and one valid each (one dataset non-square)."""
    root = tmp_path_factory.mktemp("data")
    for k, dataset in enumerate(DATASETS):
        shape = (192, 256) if k == 2 else (256, 256)
        paths = write_session(root / dataset / "micrographs", 3, SynthParams(shape=shape, diameter_px=24.0, pixel_size_A=2.0), seed=k)
        splits = ["train", "valid", "train"]
        manifest = {p.stem: {"split": s, "diam_px_est": 24.0} for p, s in zip(sorted(paths), splits)}
        (root / dataset / "manifest.json").write_text(json.dumps({"micrographs": manifest}))
    return root


@pytest.fixture(scope="module")
def packed(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pack") / ".gpu-pack"
    assert gpu_train.main(["pack", "--data", str(data), "--out", str(folder), "--grid-px", "256"]) == 0
    return folder


def test_pack_holds_the_train_splits_only_as_uint8_grid_images(data, packed):
    pack = read_pack(packed)
    assert pack.images.dtype == np.uint8 and pack.images.shape == (6, 256, 256)
    for m in pack.micrographs:
        manifest = json.loads((data / m.dataset / "manifest.json").read_text())["micrographs"]
        assert manifest[m.name]["split"] == "train" and m.split == "train"
        assert (data / m.source).is_file() and m.source.startswith(f"{m.dataset}/micrographs/")
    assert {d: len(pack.indices((d,))) for d in pack.datasets} == dict.fromkeys(DATASETS, 2)
    square, wide = pack.micrographs[0], pack.micrographs[-1]
    assert square.valid == square.shape == (256, 256) and wide.valid == (192, 256) and wide.shape == (192, 256)
    assert not pack.images[-1, 192:].any()  # beyond a smaller image: zeros, never sampled
    grid = cached_grid_image(MicrographItem(data / wide.source, 24.0), PreprocessConfig(grid_px=256), None)
    assert np.abs(pack.images[-1, :192].astype(np.float32) - grid).max() <= 0.5  # rounded, not truncated


@pytest.fixture(scope="module")
def trained(packed, tmp_path_factory) -> Path:
    """A few steps of every model, in an interpreter where mrcfile, starfile, pydantic and watchdog cannot be imported."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--pack", str(packed), "--out", str(out), "--rounds", "2", "--batch-size", "8", "--device", "cpu", "--save-every-s", "0",
            "--arch", json.dumps(TINY)]
    code = BLOCKED + f"sys.path.insert(0, {str(REPO / 'bench')!r})\nimport gpu_train\nsys.exit(gpu_train.main({argv!r}))\n"
    printed = run_python(code)
    assert "without-EMPIAR-A" in printed and "cpu:" in printed
    return out


def test_training_writes_fp16_weights_of_every_model_and_the_loss_log(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["all.npz", "log.json", "without-EMPIAR-A.npz", "without-EMPIAR-B.npz", "without-EMPIAR-C.npz"]
    record = json.loads((trained / "log.json").read_text())
    assert record["finished"] and record["device"] == "cpu" and record["rounds"] == 2 and record["progress"] == 1.0
    expected = {name: value.shape for name, value in MaskedAutoencoder(MAEArchitecture(**SMOKE_ARCH)).state_dict().items()}
    for name, model in record["models"].items():
        state, meta = read_weights(trained / model["weights"])
        assert {k: v.shape for k, v in state.items()} == expected and {v.dtype for v in state.values()} == {np.dtype(np.float16)}
        assert meta["name"] == name and meta["finished"] and meta["arch"] == SMOKE_ARCH
        share = 2 if name == "all" else 1
        assert model["steps"] == meta["steps"] == 2 * share and model["tiles"] == 16 * share
        assert meta["micrograph_epochs"] == pytest.approx(16 * share / 256)
        held_out = name.removeprefix("without-")
        assert set(model["datasets"]) == set(DATASETS) - {held_out} and len(model["micrographs"]) == 2 * len(model["datasets"])
        assert [p["step"] for p in model["curve"]] == [2 * share] and math.isfinite(model["curve"][0]["train_loss"])
        assert len(model["probe"]) == 3  # after each of the 2 rounds (--save-every-s 0) and at the end
        assert 0.3 < model["standardisation"]["mean"] < 0.7 and model["standardisation"]["std"] > 0.01
    assert {m["name"] for m in record["pack"]["index"]} == {n for m in record["models"].values() for n in m["micrographs"]}


def test_import_builds_bundles_with_the_run_in_their_provenance(trained, data, tmp_path):
    from emmae.runtime.picking.bundle import open_bundle

    assert gpu_train_import.main([str(trained), "--data", str(data), "--out", str(tmp_path), "--models", "without-EMPIAR-C", "--precision", "fp32", "int8"]) == 0
    record = json.loads((trained / "log.json").read_text())["models"]["without-EMPIAR-C"]
    state, _ = read_weights(trained / "without-EMPIAR-C.npz")
    mae = MaskedAutoencoder(MAEArchitecture(**SMOKE_ARCH)).eval()
    mae.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    tiles = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = mae.embed(torch.from_numpy(tiles)).numpy()
    for name, bound in (("model.onnx", 1e-4), ("model-int8.onnx", 0.1)):
        bundle = open_bundle(tmp_path / "without-EMPIAR-C" / name)
        got = bundle.session.run(None, {"tiles": tiles})[0]  # standardised tiles in, as torch got them
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < bound, name
        provenance = bundle.info.provenance
        assert provenance["device"] == "cpu" and provenance["micrograph_epochs"] == pytest.approx(record["tiles"] / 256)
        assert provenance["loss_curve"] == record["curve"] and provenance["probe_loss_curve"] == record["probe"]
        assert [Path(p).stem for p in provenance["train"]] == record["micrographs"] and len(provenance["valid"]) == 2
        assert math.isfinite(provenance["final_valid_loss"]) and provenance["weights"]["file"] == "model.mae.npz"
        assert bundle.info.standardisation == record["standardisation"]
    assert (tmp_path / "without-EMPIAR-C" / "model.mae.npz").is_file() and not (tmp_path / "all").exists()


def test_a_run_ends_by_itself_within_its_budget(packed, tmp_path):
    pack = read_pack(packed)
    settings = MultiSettings(batch_size=4, budget_s=3.0, reserve_s=0.5, save_every_s=100.0, device="cpu")
    start = time.perf_counter()
    record = train_models(pack, plan_models(pack, ["all"]), MAEArchitecture(**TINY), settings, tmp_path, started=start)
    assert time.perf_counter() - start < 3.0 + 5.0  # the last round and the last save after the deadline
    assert record["finished"] and record["progress"] >= 1.0 and record["models"]["all"]["steps"] >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npz", "log.json"]


def test_a_model_whose_weights_turn_non_finite_stops_and_keeps_its_last_finite_file(packed, tmp_path):
    from emmae.trainer import multi

    pack = read_pack(packed)
    settings = MultiSettings(batch_size=4, device="cpu", probe_tiles=8)
    arch = MAEArchitecture(**TINY)
    runs = [multi._make_run(pack, plan, arch, settings, torch.device("cpu")) for plan in plan_models(pack, ["all", "without-EMPIAR-A"])]
    assert [run.plan.name for run in runs] == ["without-EMPIAR-A", "all"]
    multi._save(runs, {}, arch, settings, tmp_path, 1.0, 1, 0.5, finished=False)
    before = (tmp_path / "all.npz").read_bytes()
    with torch.no_grad():
        runs[1].model.blocks[0].mlp[0].weight[0, 0] = float("nan")
    record = multi._save(runs, {}, arch, settings, tmp_path, 2.0, 2, 1.0, finished=True)
    assert (tmp_path / "all.npz").read_bytes() == before
    assert record["models"]["all"]["diverged"] and not record["models"]["without-EMPIAR-A"]["diverged"]
    assert read_weights(tmp_path / "without-EMPIAR-A.npz")[1]["finished"] and not read_weights(tmp_path / "all.npz")[1]["finished"]


def test_a_pack_that_is_missing_or_of_another_format_is_refused(packed, tmp_path):
    with pytest.raises(PackError, match="not a training pack"):
        read_pack(tmp_path)
    (tmp_path / "images.npy").write_bytes((packed / "images.npy").read_bytes())
    (tmp_path / "index.json").write_text((packed / "index.json").read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(PackError, match="format 99"):
        read_pack(tmp_path)
    assert gpu_train.main(["train", "--pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.real
def test_pack_builder_on_one_real_micrograph_per_dataset():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    pack = build_pack(REAL_DATA, PreprocessConfig(), None, limit=1)
    assert pack.images.shape[1:] == (1024, 1024) and len(pack.micrographs) == len(pack.datasets) >= 1
    for image, m in zip(pack.images, pack.micrographs):
        manifest = json.loads((REAL_DATA / m.dataset / "manifest.json").read_text())["micrographs"]
        assert manifest[m.name]["split"] == "train" and m.diameter_px == manifest[m.name]["diam_px_est"]
        grid = cached_grid_image(MicrographItem(REAL_DATA / m.source, m.diameter_px), PreprocessConfig(), None)
        assert grid.shape == m.shape
        assert np.abs(image[: m.shape[0], : m.shape[1]].astype(np.float32) - grid).max() <= 0.5
        if m.dataset == "EMPIAR-10146":  # 1240 x 1200 -> 1024 x 991 of content, padded to 1024 rows
            assert m.valid == (991, 1024) and m.shape == (1024, 1024)
