"""Relative-depth metrics after per-image scale-and-shift alignment.

Protocol (the published repo ships no depth evaluator; this follows the usual affine-invariant
depth evaluation, reference data_and_metrics.md 3c):

1. Per image, valid pixels = foreground mask & GT finite & GT > ``min_depth`` & prediction finite.
   The prediction is bilinearly resized to the GT size first if needed.
2. Least squares in **depth space** (our heads output relative depth, not disparity):
   (s, t) = argmin sum_valid (s * pred + t - gt)^2, solved in float64 from the 2x2 normal equations
   [[sum p^2, sum p], [sum p, n]] [s, t]^T = [sum p*g, sum g]^T. A constant prediction (singular
   system) gets s = 0, t = mean(gt).
3. aligned = max(s * pred + t, min_depth) (a non-positive depth has no ratio / log).
4. Per image: RMSE = sqrt(mean((a - g)^2)), AbsRel = mean(|a - g| / g),
   delta_k = share of pixels with max(a / g, g / a) < 1.25**k, k = 1, 2, 3.
5. Dataset value = mean over images that have at least 2 valid pixels (others are skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

METRIC_NAMES = ("rmse", "abs_rel", "delta1", "delta2", "delta3")


def align_scale_shift(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least-squares scale and shift mapping ``pred`` onto ``target`` over ``valid``.

    Args:
        pred, target: (B, H, W) float; valid: (B, H, W) bool.

    Returns:
        scale, shift: (B,) float64 such that scale * pred + shift ~ target on valid pixels.
    """
    w = valid.flatten(1).double()
    p = torch.where(valid, pred, torch.zeros_like(pred)).flatten(1).double()
    g = torch.where(valid, target, torch.zeros_like(target)).flatten(1).double()
    a00 = (w * p * p).sum(dim=1)
    a01 = (w * p).sum(dim=1)
    a11 = w.sum(dim=1)
    b0 = (w * p * g).sum(dim=1)
    b1 = (w * g).sum(dim=1)
    det = a00 * a11 - a01 * a01
    # Relative test: det = n^2 * var(p), so this flags an (almost) constant prediction.
    solvable = det > 1e-12 * a00 * a11
    safe_det = torch.where(solvable, det, torch.ones_like(det))
    scale = torch.where(solvable, (a11 * b0 - a01 * b1) / safe_det, torch.zeros_like(det))
    mean_target = b1 / a11.clamp(min=1)
    shift = torch.where(solvable, (a00 * b1 - a01 * b0) / safe_det, mean_target)
    return scale, shift


class DepthMetrics(Metric):
    """RMSE, AbsRel and delta<1.25^k on scale-and-shift aligned foreground depth (module doc).

    Args:
        min_depth: GT values <= this are invalid; aligned predictions are clamped to it.
        align: fit the per-image scale and shift (step 2); False compares metric depth as predicted
            (Sapiens2 pointmaps: Z / predicted scale).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, min_depth: float = 1e-3, align: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_depth = min_depth
        self.align = align
        for name in METRIC_NAMES:
            self.add_state(f"sum_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """pred: (B, 1, h, w) or (B, h, w) relative depth; target: (B, H, W) camera depth;
        mask: (B, H, W) bool foreground (None = every pixel with valid GT)."""
        if target.ndim != 3:
            raise ValueError(f"DepthMetrics: target must be (B, H, W), got {tuple(target.shape)}")
        if pred.ndim == 3:
            pred = pred[:, None]
        if pred.ndim != 4 or pred.shape[1] != 1 or pred.shape[0] != target.shape[0]:
            raise ValueError(
                f"DepthMetrics: pred must be (B, 1, h, w) or (B, h, w) with B = "
                f"{target.shape[0]}, got {tuple(pred.shape)}"
            )
        if mask is not None and mask.shape != target.shape:
            raise ValueError(
                f"DepthMetrics: mask {tuple(mask.shape)} must match target {tuple(target.shape)}"
            )
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred[:, 0].double()
        target = target.double()
        valid = torch.isfinite(target) & (target > self.min_depth) & torch.isfinite(pred)
        if mask is not None:
            valid = valid & mask.bool()
        if self.align:
            scale, shift = align_scale_shift(pred, target, valid)
        else:
            scale, shift = torch.ones_like(pred[:, 0, 0]), torch.zeros_like(pred[:, 0, 0])
        aligned = (scale[:, None, None] * pred + shift[:, None, None]).clamp(min=self.min_depth)
        safe_target = torch.where(valid, target, torch.ones_like(target))
        aligned = torch.where(valid, aligned, torch.ones_like(aligned))
        count = valid.flatten(1).sum(dim=1)
        counted = count >= 2  # one pixel is always fitted exactly; it says nothing
        n = count.clamp(min=1).double()

        def masked_mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, values, torch.zeros_like(values)).flatten(1).sum(dim=1) / n

        ratio = torch.maximum(aligned / safe_target, safe_target / aligned)
        per_image = {
            "rmse": masked_mean((aligned - safe_target) ** 2).sqrt(),
            "abs_rel": masked_mean((aligned - safe_target).abs() / safe_target),
        }
        for k in (1, 2, 3):
            per_image[f"delta{k}"] = masked_mean((ratio < 1.25**k).double())
        for name in METRIC_NAMES:
            total = getattr(self, f"sum_{name}")
            setattr(self, f"sum_{name}", total + per_image[name][counted].sum().to(total.device))
        self.num_images += counted.sum().to(self.num_images.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """-> {"rmse", "abs_rel", "delta1", "delta2", "delta3"}: means over images (NaN if none)."""
        images = self.num_images.double()
        return {name: getattr(self, f"sum_{name}") / images for name in METRIC_NAMES}
