"""Training: schedule, data, determinism, checkpoints and resume, the emmae-train command."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from emmae.config import PreprocessConfig  # noqa: E402
from emmae.synth import SynthParams, write_session  # noqa: E402
from emmae.trainer import cli  # noqa: E402
from emmae.trainer.data import MicrographItem, cached_grid_image, fit_standardisation, load_tiles  # noqa: E402
from emmae.trainer.model import MAEArchitecture  # noqa: E402
from emmae.trainer.train import TrainSettings, learning_rate, load_checkpoint, make_optimizer, train  # noqa: E402

TINY = MAEArchitecture(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
TINY_ARGS = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2"]


def test_learning_rate_schedule():
    s = TrainSettings(epochs=100, batch_size=256, base_lr=5e-4, min_lr=1e-6, warmup_epochs=5)
    peak = 5e-4 * 256 / 128
    assert learning_rate(s, 0) == 0
    assert learning_rate(s, 2.5) == pytest.approx(peak / 2)
    assert learning_rate(s, 5) == pytest.approx(peak)
    assert learning_rate(s, 52.5) == pytest.approx((peak + 1e-6) / 2)
    assert learning_rate(s, 100) == pytest.approx(1e-6)


def test_no_weight_decay_on_biases_norms_and_tokens():
    from emmae.trainer.model import MaskedAutoencoder

    model = MaskedAutoencoder(TINY)
    decay, keep = make_optimizer(model, TrainSettings()).param_groups
    assert decay["weight_decay"] == 1e-5 and keep["weight_decay"] == 0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.cls_token) not in decayed and id(model.norm.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.bias) not in decayed and id(model.blocks[0].attn.qkv.weight) in decayed


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("session")
    write_session(folder, 3, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=2.0), seed=5)
    return folder


def test_tiles_are_cached_and_standardised(session, tmp_path):
    config = PreprocessConfig(grid_px=256)
    item = MicrographItem(sorted(session.glob("*.mrc"))[0], 24.0)
    first = cached_grid_image(item, config, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(cached_grid_image(item, config, tmp_path), first)
    tiles = load_tiles([item], config, tmp_path)
    assert tiles.shape == (16, 1, 64, 64) and 0 <= tiles.min() and tiles.max() <= 1
    standard = fit_standardisation(tiles).apply(tiles)
    assert abs(standard.mean()) < 1e-4 and standard.std() == pytest.approx(1, abs=1e-4)


def _tiles(session):
    items = [MicrographItem(p, 24.0) for p in sorted(session.glob("*.mrc"))]
    return load_tiles(items, PreprocessConfig(grid_px=256), None)


def test_training_is_deterministic_and_resumes_exactly(session, tmp_path):
    tiles = _tiles(session)
    standard = fit_standardisation(tiles)
    settings = TrainSettings(epochs=2, batch_size=16, warmup_epochs=1, checkpoint_every=1, seed=3)
    model_a, state_a = train(TINY, settings, tiles, tiles[:8], standard, tmp_path / "a")
    model_b, state_b = train(TINY, settings, tiles, tiles[:8], standard, tmp_path / "b")
    assert [h["train_loss"] for h in state_a.history] == [h["train_loss"] for h in state_b.history]
    assert state_a.history[-1]["valid_loss"] > 0
    # one epoch, then resume for the second: the same weights as two epochs straight
    one = TrainSettings(epochs=1, batch_size=16, warmup_epochs=1, checkpoint_every=1, seed=3)
    train(TINY, one, tiles, None, standard, tmp_path / "c")
    resumed, state_c = train(TINY, settings, tiles, None, standard, tmp_path / "c", resume=tmp_path / "c" / "checkpoint.pt")
    assert state_c.epoch == 2
    for (name, p), q in zip(model_a.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    checkpoint = load_checkpoint(tmp_path / "a" / "checkpoint.pt")  # weights_only=True
    assert checkpoint["epoch"] == 2 and checkpoint["arch"]["embed_dim"] == 32
    assert checkpoint["standardisation"]["std"] == pytest.approx(standard.std)


def test_emmae_train_command(session, tmp_path):
    out = tmp_path / "run"
    args = [str(session), "--diameter-A", "48", "--epochs", "2", "--batch-size", "16", "--warmup-epochs", "1", "--out", str(out), "--set", "preprocess.grid_px=256", *TINY_ARGS]
    assert cli.main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"] * 1.5
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert len(checkpoint["extra"]["train"]) == 3
    assert checkpoint["extra"]["train"][0][1] == pytest.approx(24.0)  # 48 A at 2 A/px from the header
    # resume for one more epoch
    assert cli.main(["--resume", str(out / "checkpoint.pt"), str(session), "--diameter-px", "24", "--epochs", "3", "--out", str(out), "--set", "preprocess.grid_px=256"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


def test_emmae_train_reports_bad_input(tmp_path, caplog):
    assert cli.main([str(tmp_path / "nothing-here"), "--diameter-px", "20", "--out", str(tmp_path / "o")]) == 2
    assert "no micrographs found" in caplog.text
