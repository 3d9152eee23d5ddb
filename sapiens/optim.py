"""Optimizer parameter groups, layer-wise lr decay, lr scaling and per-iteration schedules.

- No weight decay on 1-D parameters (norms), biases, position embeddings and cls / mask tokens.
- Layer-wise lr decay (BEiT / Sapiens): with ``L = depth + 2`` groups, parameter ``p`` of layer ``i`` gets
  ``lr * decay ** (L - 1 - i)``; embeddings are layer 0, block ``k`` is layer ``k + 1``, the final norm and
  every head parameter are layer ``L - 1`` (scale 1).
- The lr follows the MAE rule ``base_lr * effective_batch / 256`` when a base lr is given.
- Schedules are per optimizer step: linear warm-up, then cosine, poly, linear (to 0), multi-step or constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


def scaled_lr(base_lr: float, effective_batch: int, base_batch: int = 256) -> float:
    """MAE scaling rule: ``base_lr * effective_batch / base_batch``."""
    return base_lr * effective_batch / base_batch


def effective_batch_size(per_device: int, devices: int, nodes: int, accumulation: int) -> int:
    """Samples per optimizer step across the whole job."""
    return per_device * devices * nodes * accumulation


def _no_decay(name: str, param: torch.Tensor, extra: set[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in extra or "pos_embed" in name


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    backbone: nn.Module | None = None,
    backbone_prefix: str = "backbone.",
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into AdamW groups.

    Args:
        model: the module whose ``named_parameters`` are grouped.
        weight_decay: decay for matrices; 0 for norms, biases, position embeddings and ``no_weight_decay``.
        layer_decay: layer-wise decay rate (e.g. 0.85); None or 1.0 disables it.
        backbone: the ViT inside ``model`` (needs ``layer_id(name)`` and ``depth``) for layer decay.
        backbone_prefix: how backbone parameter names start inside ``model``.
        no_weight_decay: extra full parameter names that get no weight decay.

    Returns:
        list of dicts with ``params``, ``weight_decay``, ``lr_scale`` and a readable ``name``; the lr of a
        group is ``lr * lr_scale`` (applied by :func:`build_scheduler`).
    """
    extra = set(no_weight_decay)
    use_ld = layer_decay is not None and layer_decay != 1.0
    if use_ld and backbone is None:
        raise ValueError("layer_decay needs the backbone module to assign layer ids")
    num_layers = backbone.depth + 2 if use_ld else 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = num_layers - 1
        if use_ld and name.startswith(backbone_prefix):
            layer = backbone.layer_id(name[len(backbone_prefix) :])
        decay = not _no_decay(name, param, extra)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - 1 - layer) if use_ld else 1.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


KINDS = ("cosine", "poly", "linear", "multistep", "constant")


@dataclass
class ScheduleConfig:
    """A per-step lr multiplier: linear warm-up then ``kind``.

    kind: ``cosine`` (to ``min_lr_ratio``), ``poly`` (power ``power`` to ``min_lr_ratio``), ``linear``
    (straight to ``min_lr_ratio``: Sapiens2's LinearLR warm-up + PolynomialLR(power 1)), ``multistep``
    (times ``gamma`` at each step in ``milestones`` and at each fraction of the run in
    ``milestone_fractions``, e.g. [0.81, 0.95] for the published epochs 170 and 200 of 210) or ``constant``.
    The warm-up lasts ``warmup_steps``, or ``warmup_fraction`` of the run when ``warmup_steps`` is None
    (e.g. 0.025 = the published 40 of 1600 MAE epochs).
    """

    kind: str = "cosine"
    warmup_steps: int | None = 0
    warmup_fraction: float = 0.0
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    power: float = 1.0
    milestones: list[int] = field(default_factory=list)
    milestone_fractions: list[float] = field(default_factory=list)
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def warmup(self, total_steps: int) -> int:
        """Warm-up length in steps for a run of ``total_steps``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * total_steps)

    def factor(self, step: int, total_steps: int) -> float:
        """lr multiplier at optimizer step ``step`` of ``total_steps``."""
        warmup = self.warmup(total_steps)
        if step < warmup:
            alpha = step / max(1, warmup)
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * alpha
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            marks = [*self.milestones, *(f * total_steps for f in self.milestone_fractions)]
            return self.gamma ** sum(step >= m for m in marks)
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif self.kind == "linear":
            shape = 1 - progress
        else:
            shape = (1 - progress) ** self.power
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR; each group's ``lr_scale`` multiplies its lr (layer decay)."""

    def make(scale: float) -> Callable[[int], float]:
        return lambda step: scale * schedule.factor(step, total_steps)

    lambdas = [make(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
