"""The masked autoencoder: patches, masking, loss, deterministic embedding."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from emmae.trainer.model import MAEArchitecture, MaskedAutoencoder, sincos_pos_embed  # noqa: E402

TINY = MAEArchitecture(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture
def model() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(TINY).eval()


def test_reference_size_parameter_counts():
    mae = MaskedAutoencoder()
    total = sum(p.numel() for p in mae.parameters())
    decoder = sum(p.numel() for n, p in mae.named_parameters() if n.startswith("decoder") or n == "mask_token")
    assert total == pytest.approx(5.1e6, rel=0.01)
    assert total - decoder == pytest.approx(4.16e6, rel=0.01)


def test_patchify_round_trip_and_order(model):
    imgs = torch.randn(3, 1, 64, 64)
    patches = model.patchify(imgs)
    assert patches.shape == (3, 256, 16)
    torch.testing.assert_close(model.unpatchify(patches), imgs)
    # patch 17 is row 1, column 1 of the 16x16 patch grid: pixels [4:8, 4:8]
    torch.testing.assert_close(patches[0, 17], imgs[0, 0, 4:8, 4:8].reshape(16))


def test_visible_fraction_is_one_minus_mask_ratio(model):
    tokens = torch.randn(5, 256, 32)
    for ratio in (0.0, 0.5, 0.75):
        kept, mask, ids_restore = model.random_masking(tokens, ratio)
        assert kept.shape == (5, int(256 * (1 - ratio)), 32)
        assert torch.all(mask.sum(dim=1) == 256 - kept.shape[1])
        # the kept tokens are exactly the unmasked ones, in shuffled order
        for row in range(5):
            visible = tokens[row][mask[row] == 0]
            assert torch.equal(torch.sort(visible.sum(-1)).values, torch.sort(kept[row].sum(-1)).values)
        assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(256).expand(5, -1))


def test_loss_counts_only_masked_patches(model):
    imgs = torch.randn(2, 1, 64, 64)
    pred = model.patchify(imgs).clone()
    mask = torch.zeros(2, 256)
    mask[:, :10] = 1
    pred[:, 10:] += 100.0  # huge error on visible patches only: must not count
    assert float(model.forward_loss(imgs, pred, mask)) == 0.0
    pred[:, :10] += 1.0
    assert float(model.forward_loss(imgs, pred, mask)) == pytest.approx(1.0)


def test_embed_is_deterministic_and_equals_the_unmasked_path(model):
    imgs = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        first, second = model.embed(imgs), model.embed(imgs)
        assert first.shape == (4, 256, 32)
        assert torch.equal(first, second)
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.0)
        assert mask.sum() == 0
        restored = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, 32))
        torch.testing.assert_close(restored, first, rtol=1e-5, atol=1e-5)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TINY)
    imgs = torch.randn(8, 1, 64, 64) * 0.1 + torch.linspace(-1, 1, 64)  # a learnable ramp
    optimizer = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, pred, mask = mae(imgs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert pred.shape == (8, 256, 16) and mask.shape == (8, 256)
    assert losses[-1] < 0.5 * losses[0]


def test_positional_embedding_and_scale():
    table = sincos_pos_embed(32, 16)
    assert table.shape == (257, 32)
    assert torch.all(table[0] == 0)
    assert torch.allclose(table[1:].norm(dim=1), torch.full((256,), 4.0))  # 16 (sin, cos) pairs
    mae = MaskedAutoencoder(TINY)
    torch.testing.assert_close(mae.pos_embed[0], table * 0.08)
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_pos_embed(16, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tile_px": 60, "patch_px": 8}, "multiple of patch_px"), ({"embed_dim": 30, "num_heads": 4}, "head counts"), ({"mask_ratio": 1.0}, "mask_ratio")],
)
def test_invalid_architecture(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAEArchitecture(**kwargs)
