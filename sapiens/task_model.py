"""A fine-tuned model rebuilt from a checkpoint for inference, evaluation and export.

:class:`TaskModel` is backbone + task with the parameter names of ``FinetuneModule`` (``backbone.*``,
``task.head.*``), built from a :class:`~sapiens.model_spec.ModelSpec` through the backbone factory, and
loaded strictly: every tensor of the backbone and the head must be in the file with its shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sapiens.checkpoints import extract_backbone_state, load_checkpoint_file
from sapiens.model_spec import ModelSpec, ModelSpecError, head_state, read_model_spec
from sapiens.models.factory import build_backbone

log = logging.getLogger(__name__)


class TaskModel(nn.Module):
    """Backbone + task of a spec: normalised images (B, 3, H, W) -> the head's raw output.

    Outputs: pose heatmaps (B, K, H/4, W/4), seg logits (B, N, H/2, W/2), depth (B, 1, H, W),
    normals (B, 3, H/2, W/2) at the published Sapiens strides (Sapiens2 heads: their own, e.g. seg and
    normals at stride 1); the Sapiens2 pointmap gives ``PointmapOutput(points (B, 3, H, W), scale (B, 1))``.
    ``task`` also holds the decoding (``predict`` with the flip test, ``decode``) and the pictures.
    """

    def __init__(self, spec: ModelSpec, **task_runtime):
        super().__init__()
        self.spec = spec
        self.backbone = build_backbone(
            spec.backbone, "finetune", img_size=spec.image_size, patch_padding=spec.patch_padding
        )
        self.task = spec.build_task(self.backbone.embed_dim, **task_runtime)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised float -> raw head output."""
        return self.task(self.backbone(images))


def state_dict_of(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object (under ``state_dict`` or flat)."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"{path} does not hold a state dict of tensors")
    return state


def load_task_model(
    path: str | Path,
    task: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    **task_runtime,
) -> TaskModel:
    """Rebuild and load the fine-tuned model of a checkpoint (ours, published ``.pth`` or ZeRO-converted).

    Args:
        path: the checkpoint file.
        task: the task expected (None: whatever the file holds).
        overrides: see :func:`sapiens.model_spec.read_model_spec`.
        task_runtime: run-time task options (``flip_test``).

    Returns:
        The model in eval mode on the CPU.

    Raises:
        FileNotFoundError, ValueError (:class:`ModelSpecError`): one line naming the file.
    """
    checkpoint = load_checkpoint_file(path)
    state = state_dict_of(checkpoint, path)
    spec = read_model_spec(path, checkpoint, state, task=task, overrides=overrides)
    model = TaskModel(spec, **task_runtime)
    _load_strict(model.backbone, extract_backbone_state(state), path, "backbone")
    _load_strict(model.task.head, head_state(state)[1], path, "head")
    log.info("%s: %s", path, spec.summary())
    return model.eval()


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """Load every tensor of ``module`` from ``state``; a missing or misshapen one is a one-line error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ModelSpecError(f"{path}: {len(missing)} {what} tensors missing, e.g. '{missing[0]}'")
    # A position table of another grid is resized by the backbone itself (image_size override).
    bad = [k for k in own if state[k].shape != own[k].shape and k != "pos_embed"]
    if bad:
        k = bad[0]
        raise ModelSpecError(
            f"{path}: {what} tensor '{k}' has shape {tuple(state[k].shape)}, the model built from the file's "
            f"description expects {tuple(own[k].shape)}"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)
