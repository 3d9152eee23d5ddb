"""A relative-depth loss that measures what the depth metric measures.

The published depth loss (``SiLogLoss``) compares logarithms of the foreground min-max normalised depth,
so it weighs the pixels nearest the camera (target near 0, log near -inf) far above the rest and charges
for a scale and shift that the metric (``sapiens.metrics.depth``) fits away per image. This loss fits the
same per-image least-squares scale and shift as the metric, then charges the RMSE that remains.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens.losses import _safe_sqrt, depth_at_target_size
from sapiens.metrics.depth import align_scale_shift


class ScaleShiftInvariantLoss(nn.Module):
    """Per image: (s, t) = argmin sum_valid (s * pred + t - target)^2 (closed form, differentiable), then
    loss_i = sqrt(mean_valid((s * pred + t - target)^2)). Returns the mean over images with at least 2 valid
    pixels (0 with a graph if none); valid = finite target & mask.

    Args:
        loss_weight: scalar multiplier.
    """

    def __init__(self, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = loss_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pred: (B, 1, h, w) or (B, h, w); target: (B, H, W); mask: (B, H, W) bool or None."""
        pred = depth_at_target_size("ScaleShiftInvariantLoss", pred, target)
        target = target.float()
        valid = torch.isfinite(target)
        if mask is not None:
            valid = valid & mask.bool()
        target = torch.where(valid, target, torch.zeros_like(target))
        scale, shift = align_scale_shift(pred, target, valid)
        aligned = scale.to(pred.dtype)[:, None, None] * pred + shift.to(pred.dtype)[:, None, None]
        sq = torch.where(valid, (aligned - target) ** 2, torch.zeros_like(target))
        count = valid.flatten(1).sum(dim=1)
        usable = count > 1
        if not bool(usable.any()):
            return pred.sum() * 0.0
        per_image = _safe_sqrt(sq.flatten(1).sum(dim=1) / count.clamp(min=1))
        return per_image[usable].mean() * self.loss_weight
