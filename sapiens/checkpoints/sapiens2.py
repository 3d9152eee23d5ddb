"""Published Sapiens2 checkpoint keys <-> ours, and the published key table itself.

Published layouts (reference sapiens2.md section 1, "Checkpoint key layout"):
- pretraining ``sapiens2_<size>_pretrain.safetensors``: unprefixed backbone keys
  (:func:`published_backbone_shapes`);
- task files ``sapiens2_<size>_<task>.safetensors`` (or ``.pth`` / ``.bin`` holding ``state_dict`` /
  ``model``): ``backbone.<keys above>`` + ``decode_head.*`` (head keys: the names of
  ``sapiens.models.heads_sapiens2``).

Our backbone names differ in five places (``patch_embed.proj``, ``register_tokens``, ``blocks.i.norm1/2``,
``tokenizer.blocks.j.norm1/2``, ``norm``); everything else (``attn.wq`` ... ``ffn.w3``,
``rope_embed.periods``, ``tokenizer.w_cls``) is named as published.
"""

from __future__ import annotations

import torch

from sapiens.checkpoints.keys import num_blocks, rename_rules
from sapiens.models.sapiens2 import ARCHS

FAMILY = "sapiens2"
KEY_PIECES = [
    ("patch_embed.projection.", "patch_embed.proj."),
    ("storage_tokens", "register_tokens"),
    ("blocks.{i}.ln1.", "blocks.{i}.norm1."),
    ("blocks.{i}.ln2.", "blocks.{i}.norm2."),
    ("tokenizer.blocks.{i}.ln1.", "tokenizer.blocks.{i}.norm1."),
    ("tokenizer.blocks.{i}.ln2.", "tokenizer.blocks.{i}.norm2."),
    ("ln1.", "norm."),
]
PUBLISHED_TO_OURS, OURS_TO_PUBLISHED = rename_rules(KEY_PIECES)


def published_backbone_shapes(
    embed_dim: int,
    depth: int,
    num_heads: int,
    num_register_tokens: int = 8,
    tokenizer_depth: int = 0,
    patch_size: int = 16,
    window: int = 4,
) -> dict[str, tuple[int, ...]]:
    """Every key of a published Sapiens2 backbone file and its shape, transcribed from the reference.

    KV heads: ``num_heads`` in the first 8 and last 8 blocks, ``num_heads / 2`` in between; FFN hidden 4 D;
    ``tokenizer_depth`` > 0 adds the 4K tokenizer keys.
    """
    d, hd = embed_dim, embed_dim // num_heads
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "storage_tokens": (1, num_register_tokens, d),
        "patch_embed.projection.weight": (d, 3, patch_size, patch_size),
        "patch_embed.projection.bias": (d,),
        "rope_embed.periods": (hd // 4,),
        "ln1.weight": (d,),
    }

    def block(prefix: str, kv_dim: int, trunk: bool) -> None:
        shapes[prefix + "ln1.weight"] = (d,)
        for name, rows in (("wq", d), ("wk", kv_dim), ("wv", kv_dim), ("proj", d)):
            shapes[f"{prefix}attn.{name}.weight"] = (rows, d)
            shapes[f"{prefix}attn.{name}.bias"] = (rows,)
        if trunk:  # qk-norm and layer scale only in the trunk
            shapes[prefix + "attn.q_norm.weight"] = (hd,)
            shapes[prefix + "attn.k_norm.weight"] = (hd,)
            shapes[prefix + "attn.gamma.weight"] = (d,)
        shapes[prefix + "ln2.weight"] = (d,)
        shapes.update(
            {
                prefix + "ffn.w12.weight": (8 * d, d),
                prefix + "ffn.w12.bias": (8 * d,),
                prefix + "ffn.w3.weight": (d, 4 * d),
                prefix + "ffn.w3.bias": (d,),
            }
        )

    for i in range(depth):
        grouped = 8 <= i < depth - 8
        block(f"blocks.{i}.", d // 2 if grouped else d, trunk=True)
    if tokenizer_depth:
        shapes["tokenizer.local_pos_embed"] = (1, 1 + window * window, d)
        shapes["tokenizer.w_cls"] = (1, 1, d)
        for j in range(tokenizer_depth):
            block(f"tokenizer.blocks.{j}.", d, trunk=False)
    return shapes


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    """True when keys use the published names (``storage_tokens``, ``blocks.i.ln1`` ...)."""
    return any(k == "storage_tokens" or k.startswith(("ln1.", "patch_embed.projection.")) for k in state)


def matches(state: dict[str, torch.Tensor]) -> bool:
    """True for an (unprefixed) Sapiens2 backbone state in either layout: separate q projections."""
    return any(k.endswith(".attn.wq.weight") and k.startswith("blocks.") for k in state)


def identify(state: dict[str, torch.Tensor]) -> dict:
    """Width, depth, 4K tokenizer and config name (None if not a published size) of an unprefixed state."""
    wq = state["blocks.0.attn.wq.weight"]
    width, depth = int(wq.shape[0]), num_blocks(state)
    tokenizer = num_blocks(state, "tokenizer.blocks.")
    size = next(
        (n for n, a in ARCHS.items() if (a["embed_dim"], a["depth"]) == (width, depth)),
        None,
    )
    return {"embed_dim": width, "depth": depth, "size": size, "tokenizer": tokenizer > 0}
