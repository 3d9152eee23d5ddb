"""Backbone families by name: the one place that turns ``model.backbone`` into a module.

Tasks, MAE, optimizer groups and checkpoint loading talk to the backbone API, never to a family. A family is
chosen by ``model.backbone.family`` (default ``vit``); a new family adds one entry to :data:`FAMILIES` and one
model file beside ``vit.py``.

Families: ``vit`` (the Sapiens ViT, :mod:`sapiens.models.vit`) and ``sapiens2``
(:mod:`sapiens.models.sapiens2`).

The backbone API every family implements (shapes: B batch, D width, (h, w) patch grid, L = h*w, P prefix
tokens, K tokens kept):

- attributes ``embed_dim``, ``depth``, ``patch_size``, ``num_prefix_tokens`` (P: 1 for the ViT with a cls
  token, 0 without, 9 for Sapiens2: cls + 8 registers), ``grid_size`` (the build-time grid);
- ``forward(images (B, 3, H, W)) -> (B, D, H/16, W/16)`` feature map (what task heads take);
- ``forward_features(images) -> (B, P + L, D)`` normalised tokens, prefix first (cls at index 0);
- ``embed(images) -> (tokens (B, L, D), grid)``: patch tokens in raster order, absolute positions added where
  the family has them;
- ``encode(tokens (B, K, D), grid, positions (B, K) long | None) -> (B, P + K, D)``: prefix prepended, blocks,
  final norm. ``positions`` are the raster indices of the given tokens; families with relative positions
  (Sapiens2's RoPE) use them, so a masked subset keeps its true positions. Masking objectives (MAE, issue 13's
  objective) gather kept tokens between ``embed`` and ``encode``;
- ``layer_id(name)`` (0 = embeddings, i + 1 = block i, depth + 1 = final norm), ``no_weight_decay()``,
  ``set_grad_checkpointing(enable)``.

Two roles exist because the published ViTs differ between pretraining and fine-tuning:
- ``pretrain``: the MAE encoder (for the ViT: frozen sin-cos position table with a cls token);
- ``finetune``: the backbone under a task head (for the ViT: learnable table on the crop grid, no cls).
Sapiens2 is the same module in both roles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from torch import nn

from sapiens.models.sapiens2 import Sapiens2
from sapiens.models.vit import VisionTransformer

log = logging.getLogger(__name__)

Role = Literal["pretrain", "finetune"]


def _vit(role: Role, **kwargs) -> nn.Module:
    if role == "pretrain":
        return VisionTransformer(pos_embed="sincos", cls_token=True, **kwargs)
    return VisionTransformer(pos_embed="learned", cls_token=False, **kwargs)


def _sapiens2(role: Role, **kwargs) -> nn.Module:
    return Sapiens2(**kwargs)


# family name -> fn(role, img_size=..., patch_padding=..., ..., **shape) -> backbone module
FAMILIES: dict[str, Callable[..., nn.Module]] = {"vit": _vit, "sapiens2": _sapiens2}


def backbone_family(spec: dict) -> str:
    """The family named by a ``model.backbone`` dict (``vit`` when absent)."""
    return str(spec.get("family", "vit"))


def build_backbone(spec: dict, role: Role, img_size: tuple[int, int], **kwargs) -> nn.Module:
    """Build the backbone of ``spec`` (``model.backbone``: family + shape) for ``role``.

    Args:
        spec: ``{"family": "vit", "embed_dim": ..., "depth": ..., "num_heads": ..., ...}``.
        role: ``pretrain`` (MAE encoder) or ``finetune`` (under a task head).
        img_size: (H, W) the model is built for.
        kwargs: run-time options every family takes (``patch_padding``, ``drop_path_rate``,
            ``grad_checkpointing``). A key the spec fixes itself wins: Sapiens2 configs fix
            ``patch_padding: 0`` (published), whatever the task's default for the ViT is.

    Returns:
        A module mapping images (B, 3, H, W) to a feature map (B, C, H/p, W/p).
    """
    if role not in ("pretrain", "finetune"):
        raise ValueError(f"backbone role must be 'pretrain' or 'finetune', got {role!r}")
    shape = dict(spec)
    family = backbone_family(shape)
    shape.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(
            f"model.backbone.family={family!r} is not a known backbone family; "
            f"choose one of {sorted(FAMILIES)}"
        )
    for key in set(shape) & set(kwargs):
        if shape[key] != kwargs[key]:
            log.info(
                "model.backbone.%s=%s (the %s architecture) overrides %s",
                key,
                shape[key],
                family,
                kwargs[key],
            )
        kwargs.pop(key)
    return FAMILIES[family](role, img_size=tuple(img_size), **shape, **kwargs)
