"""Backbone: published sizes, position-embedding handling, patch padding, checkpointing."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sapiens.models.factory import build_backbone
from sapiens.models.pos_embed import resize_pos_embed, sincos_2d
from sapiens.models.vit import VisionTransformer

CONF = Path(__file__).resolve().parents[1] / "conf"
PUBLISHED_BILLIONS = {"sapiens_0.3b": 0.307, "sapiens_0.6b": 0.636, "sapiens_1b": 1.141, "sapiens_2b": 2.134}


def tiny(**kw) -> VisionTransformer:
    args = dict(img_size=(64, 48), embed_dim=64, depth=2, num_heads=4)
    return VisionTransformer(**{**args, **kw})


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_sizes_on_meta_device(name):
    """The model configs build the published backbones (1024x1024, cls, sin-cos) to within 0.5%."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_backbone(OmegaConf.to_container(cfg.backbone), "pretrain", img_size=(1024, 1024))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(billions - PUBLISHED_BILLIONS[name]) / PUBLISHED_BILLIONS[name] < 0.005
    with torch.device("meta"):
        feats = model(torch.empty(1, 3, 1024, 768, device="meta"))
    assert feats.shape == (1, cfg.backbone.embed_dim, 64, 48)


def test_block_layout_matches_published_architecture():
    m = tiny()
    block = m.blocks[0]
    assert block.norm1.eps == 1e-6 and m.norm.eps == 1e-6
    assert block.attn.qkv.bias is not None and block.attn.qkv.out_features == 3 * 64
    assert block.mlp.fc1.out_features == 4 * 64
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
    assert not any("gamma" in n or "ls" in n.split(".") for n, _ in m.named_parameters())


def test_sincos_table_layout():
    table = sincos_2d((4, 3), 8, cls_token=True)
    assert table.shape == (1, 13, 8)
    assert torch.all(table[0, 0] == 0)  # cls row
    # order [sin w, cos w, sin h, cos h]: token (row 1, col 2) -> w = 2, h = 1, first frequency 1
    tok = table[0, 1 + 1 * 3 + 2]
    assert torch.isclose(tok[0], torch.sin(torch.tensor(2.0)))
    assert torch.isclose(tok[2], torch.cos(torch.tensor(2.0)))
    assert torch.isclose(tok[4], torch.sin(torch.tensor(1.0)))


def test_resize_pos_embed_identity_and_shape():
    table = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(table, (4, 4), num_prefix_tokens=1, keep_prefix=True)
    assert torch.equal(same, table)
    out = resize_pos_embed(table, (4, 3), num_prefix_tokens=1)
    assert out.shape == (1, 12, 8)
    # A constant table stays constant under bicubic resizing.
    const = torch.ones(1, 16, 8)
    assert torch.allclose(resize_pos_embed(const, (6, 5)), torch.ones(1, 30, 8), atol=1e-5)


def test_pretrained_table_loads_into_finetune_model():
    """cls row stripped, 8x8 grid bicubically resized to 4x3, learnable, other tensors copied."""
    pre = VisionTransformer(img_size=(128, 128), embed_dim=64, depth=2, num_heads=4)
    fine = tiny(pos_embed="learned", cls_token=False)
    result = fine.load_state_dict(pre.state_dict(), strict=False)
    assert result.unexpected_keys == ["cls_token"] and result.missing_keys == []
    expected = resize_pos_embed(pre.pos_embed[:, 1:].detach(), (4, 3), old_hw=(8, 8))
    assert torch.allclose(fine.pos_embed, expected)
    assert fine.pos_embed.requires_grad and not pre.pos_embed.requires_grad
    assert torch.equal(fine.blocks[1].mlp.fc2.weight, pre.blocks[1].mlp.fc2.weight)


def test_runtime_grid_change_resizes_position_embedding():
    m = tiny(pos_embed="learned", cls_token=False)
    assert m(torch.randn(2, 3, 64, 48)).shape == (2, 64, 4, 3)
    assert m(torch.randn(2, 3, 96, 64)).shape == (2, 64, 6, 4)
    assert m.grid_pos_embed((6, 4)).shape == (1, 24, 64)


def test_patch_padding_two_keeps_grid():
    m = tiny(patch_padding=2, pos_embed="learned", cls_token=False)
    assert m.patch_embed.proj.padding == (2, 2)
    assert m(torch.randn(1, 3, 64, 48)).shape == (1, 64, 4, 3)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = tiny()
    x = torch.randn(2, 3, 64, 48)
    m(x).square().mean().backward()
    ref = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().mean().backward()
    got = [p.grad for p in m.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, got, strict=True))


def test_layer_ids_for_layer_decay():
    m = tiny()
    assert m.layer_id("pos_embed") == 0 and m.layer_id("patch_embed.proj.weight") == 0
    assert m.layer_id("blocks.0.attn.qkv.weight") == 1
    assert m.layer_id("blocks.1.norm2.bias") == 2
    assert m.layer_id("norm.weight") == 3


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        VisionTransformer(img_size=(100, 48), embed_dim=64, depth=1, num_heads=4)
