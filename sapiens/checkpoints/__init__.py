"""Checkpoint formats: published key layouts <-> ours, safe loading for initialisation, .safetensors files.

One key table per backbone family: :mod:`sapiens.checkpoints.vit` (Sapiens, mmpretrain names) and
:mod:`sapiens.checkpoints.sapiens2`. Accepted inputs of :func:`load_backbone_state` / :func:`load_head_state`:

- published files: Sapiens ``sapiens_*_clean.pth`` and fine-tuned ``.pth``; Sapiens2
  ``*_pretrain.safetensors`` (unprefixed keys) and task files (``backbone.`` + ``decode_head.``,
  ``.safetensors`` or ``.pth`` / ``.bin`` holding ``state_dict`` / ``model`` / ``teacher``);
- Lightning checkpoints of this project (pretraining or fine-tuning), our ``.safetensors`` exports
  (``python -m sapiens.checkpoints.export``) and consolidated DeepSpeed ZeRO files (``sapiens.zero_to_fp32``).

Self-distillation checkpoints (``task=pretrain_distill``) hold two encoders: the student in ``state_dict``
(``model.encoder.*``) and the EMA teacher in a top-level ``teacher`` entry (``backbone.*``, the form
Sapiens2's pretrained-init loader reads). ``weights="teacher"`` (the default) initialises from the teacher,
as Sapiens2 does; ``weights="student"`` from the student. Files with one set of weights give it either way.

Loading is key by key: missing and unexpected keys are reported by name, shape mismatches are an error naming
the tensor. :func:`identify_checkpoint` tells the family, size, layout and task head of any state dict.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sapiens.checkpoints import sapiens2, vit
from sapiens.checkpoints.files import (
    WEIGHT_SOURCES,
    describe_load_failure,
    load_checkpoint_file,
    read_checkpoint,
    write_safetensors,
)
from sapiens.checkpoints.keys import rename_keys, strip_prefix
from sapiens.checkpoints.vit import KEY_PIECES, OURS_TO_PUBLISHED, PUBLISHED_TO_OURS, is_published_layout

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONE_PREFIXES",
    "describe_load_failure",
    "load_checkpoint_file",
    "HEAD_PREFIXES",
    "KEY_PIECES",
    "LAYOUTS",
    "OURS_TO_PUBLISHED",
    "PUBLISHED_TO_OURS",
    "extract_backbone_state",
    "identify_checkpoint",
    "is_published_layout",
    "load_backbone_state",
    "load_head_state",
    "read_checkpoint",
    "rename_keys",
    "to_published_layout",
    "write_safetensors",
    "WEIGHT_SOURCES",
]

# family -> its key table module (rename rules, matches(), identify(), is_published_layout())
LAYOUTS = {vit.FAMILY: vit, sapiens2.FAMILY: sapiens2}
# Prefixes under which a backbone sits in the checkpoints we accept, most specific first.
BACKBONE_PREFIXES = ("model.encoder.", "backbone.", "encoder.", "module.backbone.")
# Prefixes of task heads in published fine-tuned checkpoints (Sapiens pose: head., everything else:
# decode_head.) and in ours (task.head.).
HEAD_PREFIXES = ("task.head.", "decode_head.", "head.")


def _family_of(state: dict[str, torch.Tensor]) -> str | None:
    return next((name for name, layout in LAYOUTS.items() if layout.matches(state)), None)


def extract_backbone_state(
    state: dict[str, torch.Tensor], family: str | None = None
) -> dict[str, torch.Tensor]:
    """Backbone tensors of any accepted checkpoint, with our key names and no prefix.

    ``family`` picks the key table (``vit`` / ``sapiens2``); None: recognised from the keys.
    """
    state = strip_prefix(state, BACKBONE_PREFIXES)
    layout = LAYOUTS.get(family or _family_of(state) or vit.FAMILY)
    if layout is None:
        raise ValueError(f"unknown backbone family {family!r}; known: {sorted(LAYOUTS)}")
    if layout.is_published_layout(state):
        state = rename_keys(state, layout.PUBLISHED_TO_OURS)
    return state


def identify_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """What a state dict (any accepted layout) holds, from its key names and tensor shapes.

    Returns:
        ``{"family": "vit" | "sapiens2" | None, "size": config name (e.g. "sapiens2_1b") or None,
        "layout": "published" | "ours" | None, "embed_dim", "depth", "tokenizer": bool,
        "head": head info (:func:`sapiens.models.heads_sapiens2.identify_head`) or None}``.
    """
    from sapiens.models.heads_sapiens2 import identify_head

    backbone = strip_prefix(state, BACKBONE_PREFIXES)
    family = _family_of(backbone)
    info: dict = {"family": family, "size": None, "layout": None, "embed_dim": None, "depth": None}
    info["tokenizer"] = False
    if family is not None:
        layout = LAYOUTS[family]
        info["layout"] = "published" if layout.is_published_layout(backbone) else "ours"
        info.update(layout.identify(extract_backbone_state(backbone, family)))
    head = strip_prefix(state, HEAD_PREFIXES)
    info["head"] = identify_head(head, family) if head is not state else None
    return info


def to_published_layout(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our unprefixed backbone keys -> the family's published names (other keys unchanged)."""
    return rename_keys(state, LAYOUTS[family].OURS_TO_PUBLISHED)


def load_backbone_state(
    backbone: nn.Module,
    source: str | Path | dict[str, torch.Tensor],
    strict: bool = False,
    weights: str = "teacher",
) -> dict:
    """Initialise ``backbone`` from a checkpoint file or state dict; returns ``{"missing": [...],
    "unexpected": [...]}``.

    The ViT adapts a position table of another shape itself (cls row stripped, grid resized bicubically).
    Missing and unexpected keys are logged by name; ``strict`` turns missing keys into an error.
    ``weights``: the ``teacher`` or ``student`` encoder of a self-distillation checkpoint.
    """
    name = source if not isinstance(source, dict) else "<state dict>"
    raw = read_checkpoint(source, weights=weights) if not isinstance(source, dict) else source
    family = getattr(backbone, "family", vit.FAMILY)
    found = _family_of(strip_prefix(raw, BACKBONE_PREFIXES))
    if found is not None and found != family:
        raise ValueError(
            f"{name} holds a {found!r} backbone, but the model is a {family!r} one "
            f"(set model.backbone.family / model=... to match the checkpoint)"
        )
    state = extract_backbone_state(raw, family)
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and k != "pos_embed" and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        size = LAYOUTS[family].identify(state).get("size") if found else None
        holds = f"; the file holds {size}" if size else ""
        raise ValueError(
            f"{name}: {len(mismatched)} tensors do not fit the backbone, e.g. '{k}' has shape "
            f"{tuple(state[k].shape)} but the model expects {tuple(own[k].shape)} "
            f"(wrong model size in the config?{holds})"
        )
    result = backbone.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    loaded = len(state) - len(report["unexpected"])
    log.info("loaded %d backbone tensors from %s", loaded, name)
    if report["missing"]:
        log.warning("missing keys (left at their init): %s", ", ".join(report["missing"]))
    if report["unexpected"]:
        log.info("unused keys: %s", ", ".join(report["unexpected"]))
    if strict and report["missing"]:
        raise ValueError(f"{name}: missing backbone keys {report['missing']}")
    if loaded == 0:
        raise ValueError(f"{name}: no backbone tensor matched; is this a Sapiens / sapiens-train checkpoint?")
    return report


def load_head_state(head: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> list[str]:
    """Load a task head from a fine-tuned checkpoint (published or ours) when it has one that fits.

    Returns the names of the loaded tensors; an empty list when the file holds no head of this layout
    (e.g. a pretraining checkpoint, another task, or another number of keypoints), which is logged with the
    missing, unexpected and mismatched key names, not an error.
    """
    name = source if not isinstance(source, dict) else "<state dict>"
    # task heads live in the student's state_dict
    state = read_checkpoint(source, weights="student") if not isinstance(source, dict) else source
    sub = strip_prefix(state, HEAD_PREFIXES)
    if sub is state:
        return []
    own = head.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    resized = sorted(k for k in set(own) & set(sub) if sub[k].shape != own[k].shape)
    if missing or unexpected or resized:
        log.info(
            "%s has a head that does not fit this task's head (missing %s; unexpected %s; other shapes %s); "
            "the head starts from scratch",
            name,
            missing or "none",
            unexpected or "none",
            resized or "none",
        )
        return []
    head.load_state_dict(sub)
    log.info("loaded the task head (%d tensors) from %s", len(sub), name)
    return sorted(sub)
