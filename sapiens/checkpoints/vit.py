"""Published Sapiens ViT (mmpretrain) checkpoint keys <-> ours (timm names).

Published layouts (reference sapiens.md section 5):
- pretraining ``sapiens_*_clean.pth``: a flat dict of encoder keys (``cls_token``, ``pos_embed`` (1, 4097, C),
  ``patch_embed.projection.*``, ``layers.i.{ln1,attn.qkv,attn.proj,ln2,ffn.layers.0.0,ffn.layers.1}.*``,
  ``ln1.*``);
- fine-tuned: ``{"state_dict": {"backbone.<keys above>", "head.*" | "decode_head.*"}, "meta": ...}``.
"""

from __future__ import annotations

import torch

from sapiens.checkpoints.keys import num_blocks, rename_rules

FAMILY = "vit"
# Backbone key pieces: (published mmpretrain name, ours); "{i}" stands for the block index.
KEY_PIECES = [
    ("patch_embed.projection.", "patch_embed.proj."),
    ("layers.{i}.ln1.", "blocks.{i}.norm1."),
    ("layers.{i}.ln2.", "blocks.{i}.norm2."),
    ("layers.{i}.attn.", "blocks.{i}.attn."),
    ("layers.{i}.ffn.layers.0.0.", "blocks.{i}.mlp.fc1."),
    ("layers.{i}.ffn.layers.1.", "blocks.{i}.mlp.fc2."),
    ("ln1.", "norm."),
]
PUBLISHED_TO_OURS, OURS_TO_PUBLISHED = rename_rules(KEY_PIECES)
# (width, depth) -> model config name (conf/model/sapiens_*.yaml)
SIZES = {
    (1024, 24): "sapiens_0.3b",
    (1280, 32): "sapiens_0.6b",
    (1536, 40): "sapiens_1b",
    (1920, 48): "sapiens_2b",
}


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    """True when keys use the mmpretrain names (``layers.i.ln1`` ...)."""
    return any(k.startswith(("layers.", "patch_embed.projection.")) for k in state)


def matches(state: dict[str, torch.Tensor]) -> bool:
    """True for an (unprefixed) ViT backbone state in either layout: a fused qkv projection."""
    return any(k.endswith(".attn.qkv.weight") for k in state)


def identify(state: dict[str, torch.Tensor]) -> dict:
    """Width, depth and config name (None if not a published size) of an unprefixed ViT backbone state."""
    published = is_published_layout(state)
    depth = num_blocks(state, "layers." if published else "blocks.")
    qkv = next(v for k, v in state.items() if k.endswith(".attn.qkv.weight"))
    width = int(qkv.shape[1])
    return {"embed_dim": width, "depth": depth, "size": SIZES.get((width, depth)), "tokenizer": False}
