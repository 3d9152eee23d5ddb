"""MAE: masking invariants, loss only on masked patches, learning on a fixed batch."""

import pytest
import torch

from sapiens.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from sapiens.models.vit import VisionTransformer


def tiny_mae(mask_ratio=0.75, norm_pix=True) -> MaskedAutoencoder:
    enc = VisionTransformer(img_size=(64, 48), embed_dim=64, depth=2, num_heads=4)
    return MaskedAutoencoder(
        enc, decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=mask_ratio, norm_pix_loss=norm_pix
    )


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.95])
def test_masking_keeps_exact_count_and_differs_per_sample(ratio):
    tokens = torch.arange(4 * 40, dtype=torch.float32).reshape(4, 40, 1).repeat(1, 1, 3)
    kept, mask, ids_restore = random_masking(tokens, ratio)
    keep = max(1, int(40 * (1 - ratio)))
    assert kept.shape == (4, keep, 3)
    assert torch.all(mask.sum(1) == 40 - keep)
    # The kept tokens are exactly the unmasked ones.
    for b in range(4):
        assert torch.equal(kept[b, :, 0].sort().values, tokens[b, mask[b] == 0, 0].sort().values)
    assert len({tuple(m.tolist()) for m in mask}) > 1
    # ids_restore inverts the shuffle.
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(40).expand(4, 40))


def test_patchify_roundtrip_non_square():
    x = torch.randn(2, 3, 64, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 12, 768)
    assert torch.equal(unpatchify(p, 16, (4, 3)), x)


def test_loss_counts_only_masked_patches():
    mae = tiny_mae()
    imgs = torch.randn(2, 3, 64, 48)
    gen = torch.Generator().manual_seed(0)
    loss, pred, mask = mae(imgs, generator=gen)
    changed = pred.detach() + (1 - mask).unsqueeze(-1) * 100.0  # disturb visible patches only
    assert torch.isclose(mae.loss(imgs, changed, mask), loss.detach())
    changed_masked = pred.detach() + mask.unsqueeze(-1) * 1.0
    assert not torch.isclose(mae.loss(imgs, changed_masked, mask), loss.detach())


def test_encoder_sees_only_visible_tokens():
    mae = tiny_mae(mask_ratio=0.75)
    latent, mask, _, grid = mae.forward_encoder(torch.randn(3, 3, 64, 48), 0.75)
    assert grid == (4, 3)
    assert latent.shape == (3, 1 + 3, 64)  # cls + int(12 * 0.25) visible tokens


def test_high_mask_ratio_and_other_image_size():
    mae = tiny_mae(mask_ratio=0.95)
    loss, pred, mask = mae(torch.randn(2, 3, 96, 64))
    assert torch.isfinite(loss) and pred.shape == (2, 24, 768)
    assert torch.all(mask.sum(1) == 24 - 1)


def fit_fixed_batch(mae: MaskedAutoencoder, steps: int = 60, on_backward=None) -> list[float]:
    """AdamW steps on smooth images (upsampled 4x3 noise, so hidden patches are predictable from the
    visible ones) with two alternating masks; returns the losses. ``on_backward(step)`` runs after each
    backward pass."""
    imgs = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 3), size=(64, 48), mode="bilinear")
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        loss, _, _ = mae(imgs, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        if on_backward is not None:
            on_backward(step)
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    losses = fit_fixed_batch(tiny_mae())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_reconstruction_pastes_visible_patches():
    mae = tiny_mae()
    imgs = torch.randn(1, 3, 64, 48)
    _, pred, mask = mae(imgs)
    masked, recon = mae.reconstruct(imgs, pred, mask)
    visible = unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, 768), 16, (4, 3)).bool()
    assert torch.allclose(recon[visible], imgs[visible])
    assert torch.all(masked[~visible] == 0)


def test_mae_needs_cls_encoder():
    enc = VisionTransformer(
        img_size=(64, 48), embed_dim=64, depth=1, num_heads=4, cls_token=False, pos_embed="learned"
    )
    with pytest.raises(ValueError, match="cls_token=True"):
        MaskedAutoencoder(enc)
