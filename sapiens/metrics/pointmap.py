"""Pointmap metrics (reference sapiens2.md section 3): errors of canonical XYZ, and normals from the points.

Per valid pixel (mask & target depth > 0 & finite prediction), e = ||p - g||_2 in canonical units (metres
times s = f_c / fx). Dataset values are pixel-level sums (every valid pixel of every image weighs the same):
``l2`` = mean e, ``mae_x`` / ``mae_y`` / ``mae_z`` = mean |p - g| per axis, ``rmse`` = sqrt(mean e^2) and
``within_5cm`` / ``10cm`` / ``20cm`` = % of pixels with e below 0.05 / 0.1 / 0.2. ``scale_abs_rel`` is the
mean over images of |s_pred - s| / s.

Normals from points: 5x5 Sobel derivatives of the XYZ maps along u and v, n = normalize(d/du x d/dv), on
pixels whose whole 5x5 window is valid (:func:`sobel_normals`); their angular errors use
:class:`sapiens.metrics.normals.NormalMetrics`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from sapiens.metrics.normals import add_error_states

THRESHOLDS = (0.05, 0.10, 0.20)
SOBEL_SMOOTH = (1.0, 4.0, 6.0, 4.0, 1.0)
SOBEL_DERIV = (-1.0, -2.0, 0.0, 2.0, 1.0)


def sobel_normals(points: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals of a pointmap from 5x5 Sobel derivatives.

    Args:
        points: (B, 3, H, W) XYZ. valid: (B, H, W) bool.

    Returns:
        normals (B, 3, H, W) unit vectors (0 outside), and valid (B, H, W): pixels whose 5x5 window is valid.
    """
    smooth = torch.tensor(SOBEL_SMOOTH, dtype=torch.float32, device=points.device)
    deriv = torch.tensor(SOBEL_DERIV, dtype=torch.float32, device=points.device)
    du_kernel = torch.outer(smooth, deriv)  # rows smooth, columns differentiate (d/du)
    kernels = torch.stack([du_kernel, du_kernel.T])[:, None]  # (2, 1, 5, 5): d/du, d/dv
    b, _, h, w = points.shape
    x = points.float().reshape(b * 3, 1, h, w) * valid.repeat_interleave(3, 0)[:, None].float()
    grads = F.conv2d(x, kernels, padding=2).reshape(b, 3, 2, h, w)
    normals = F.normalize(torch.cross(grads[:, :, 0], grads[:, :, 1], dim=1), dim=1, eps=1e-12)
    window = F.avg_pool2d(valid[:, None].float(), 5, stride=1, padding=2, count_include_pad=True)[:, 0]
    inner = window > 1 - 1e-6
    return normals * inner[:, None], inner


class PointmapMetrics(Metric):
    """Pixel-level XYZ errors of canonical pointmaps and the scale error (module docstring)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        add_error_states(self, len(THRESHOLDS))
        self.add_state("sum_abs_axis", default=torch.zeros(3, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_scale_rel", default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        points: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor,
        scale: torch.Tensor | None = None,
        target_scale: torch.Tensor | None = None,
    ) -> None:
        """points, target: (B, 3, H, W) canonical XYZ (points resized to the target first if needed);
        valid: (B, H, W) bool; scale, target_scale: (B, 1) / (B,) or None."""
        if points.shape[-2:] != target.shape[-2:]:
            points = F.interpolate(
                points.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
            )
        diff = points.double() - target.double()
        valid = valid.bool() & torch.isfinite(diff).all(1)
        d = diff.permute(0, 2, 3, 1)[valid]  # (N, 3)
        error = d.norm(dim=1)
        self.sum_error += error.sum()
        self.sum_sq_error += (error**2).sum()
        self.sum_abs_axis += d.abs().sum(0)
        self.num_within += torch.stack([(error < t).sum() for t in THRESHOLDS])
        self.num_pixels += error.numel()
        if scale is not None and target_scale is not None:
            s, t = scale.double().reshape(-1), target_scale.double().reshape(-1)
            self.sum_scale_rel += ((s - t).abs() / t.abs().clamp(min=1e-12)).sum()
            self.num_images += s.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """-> l2, mae_x, mae_y, mae_z, rmse, within_5cm, within_10cm, within_20cm (%), scale_abs_rel."""
        n = self.num_pixels.double()
        out = {"l2": self.sum_error / n, "rmse": (self.sum_sq_error / n).sqrt()}
        for axis, value in zip("xyz", self.sum_abs_axis / n, strict=True):
            out[f"mae_{axis}"] = value
        for threshold, within in zip(THRESHOLDS, self.num_within, strict=True):
            out[f"within_{round(threshold * 100)}cm"] = 100.0 * within.double() / n
        out["scale_abs_rel"] = self.sum_scale_rel / self.num_images.double()
        return out
