"""Backbone families by name: the one place that turns ``model.backbone`` into a module.

Tasks, MAE, optimizer groups and checkpoint loading talk to the backbone API (feature map out,
``forward_features``, ``layer_id``, ``no_weight_decay``, ``set_grad_checkpointing``), never to a family.
A family is chosen by ``model.backbone.family`` (default ``vit``, the Sapiens ViT); a new family adds one
entry to :data:`FAMILIES` and one model file beside ``vit.py``.

Two roles exist because the published models differ between pretraining and fine-tuning:
- ``pretrain``: the MAE encoder (for the ViT: frozen sin-cos position table with a cls token);
- ``finetune``: the backbone under a task head (for the ViT: learnable table on the crop grid, no cls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

from sapiens.models.vit import VisionTransformer

Role = Literal["pretrain", "finetune"]


def _vit(role: Role, **kwargs) -> nn.Module:
    if role == "pretrain":
        return VisionTransformer(pos_embed="sincos", cls_token=True, **kwargs)
    return VisionTransformer(pos_embed="learned", cls_token=False, **kwargs)


# family name -> fn(role, img_size=..., patch_padding=..., ..., **shape) -> backbone module
FAMILIES: dict[str, Callable[..., nn.Module]] = {"vit": _vit}


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
            ``grad_checkpointing``).

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
    return FAMILIES[family](role, img_size=tuple(img_size), **shape, **kwargs)
