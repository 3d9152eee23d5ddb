"""Losses of the Sapiens2 recipes that Sapiens did not have (reference sapiens2.md section 3): Dice for the
29-class segmentation, the finite-difference term of the normal loss, and the pointmap loss set.

Like :mod:`sapiens.losses`, every loss computes in float32 and returns a scalar; dense predictions are
bilinearly resized to the label size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiens.losses import SiLogLoss, _check_shape, resize_to

# Published Sapiens2 29-class weights (index = class id; 2 = Eyeglass, new in Sapiens2; background 0.1).
SAPIENS2_CLASS_WEIGHTS: tuple[float, ...] = (
    0.1, 10, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2, 6, 10, 3, 3, 1, 1, 10, 10, 10, 10, 10,
)  # fmt: skip


class DiceLoss(nn.Module):
    """Softmax Dice over the foreground classes (class 0, background, excluded), ignore label masked out.

    Per sample and class c >= 1: ``1 - (2 sum(p_c y_c) + smooth) / (sum(p_c^2) + sum(y_c^2) + smooth)`` over
    the non-ignored pixels (exponent 2, smooth 1: the mmseg defaults the published config keeps),
    averaged over classes and samples.

    Args:
        ignore_index: label excluded (255). smooth: additive smoothing. loss_weight: scalar multiplier.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.ignore_index, self.smooth, self.loss_weight = ignore_index, smooth, loss_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (B, C, h, w); labels: (B, H, W) int class ids or ignore_index. -> scalar."""
        _check_shape("DiceLoss logits", logits, 4, "(B, C, h, w)")
        return self.from_probs(resize_to(logits.float(), tuple(labels.shape[-2:])).softmax(dim=1), labels)

    def from_probs(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same loss from softmax probabilities already at the label size: probs (B, C, H, W),
        labels (B, H, W). Lets a caller share one softmax between this and a cross-entropy term."""
        _check_shape("DiceLoss probabilities", probs, 4, "(B, C, H, W)")
        _check_shape("DiceLoss labels", labels, 3, "(B, H, W)")
        batch, classes = probs.shape[:2]
        valid = (labels != self.ignore_index).flatten(1)  # (B, H*W)
        ids = torch.where(valid, labels.flatten(1).long(), 0)
        probs = probs.flatten(2)  # (B, C, H*W)
        # The one-hot target is never built: sum(p_c y_c) gathers each pixel's true-class probability and
        # sums it per class, and sum(y_c^2) is the class's pixel count (28 classes: 3x fewer passes).
        true_prob = probs.gather(1, ids[:, None]).squeeze(1) * valid
        inter = probs.new_zeros(batch, classes).scatter_add_(1, ids, true_prob)
        count = probs.new_zeros(batch, classes).scatter_add_(1, ids, valid.to(probs.dtype))
        # sum over valid pixels of p_c^2 as a batched mat-vec: no masked copy of the probabilities.
        denom = torch.bmm(probs.square(), valid.to(probs.dtype)[:, :, None]).squeeze(2) + count
        dice = 1 - (2 * inter + self.smooth) / (denom + self.smooth)
        return dice[:, 1:].mean() * self.loss_weight


class NormalGradientLoss(nn.Module):
    """The published ``NormalGradL1Loss``: despite its name, the MSE between horizontal and vertical finite
    differences of the predicted and target normals, over pixel pairs that are both foreground."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred: (B, 3, h, w); target: (B, 3, H, W); mask: (B, H, W) bool. -> scalar."""
        pred = resize_to(pred.float(), tuple(target.shape[-2:]))
        target, mask = target.float(), mask.bool()[:, None]
        total, count = pred.new_zeros(()), pred.new_zeros(())
        for dim in (-1, -2):
            n = pred.shape[dim] - 1
            dp = pred.narrow(dim, 1, n) - pred.narrow(dim, 0, n)
            dt = target.narrow(dim, 1, n) - target.narrow(dim, 0, n)
            pair = (mask.narrow(dim, 1, n) & mask.narrow(dim, 0, n)).float()
            total = total + ((dp - dt) ** 2 * pair).sum()
            count = count + 3 * pair.sum()
        return total / count.clamp(min=1)


def pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) pixel coordinates (H, W) float32, pixel centres at integers (OpenCV convention)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return u, v


def points_from_depth(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-frame XYZ of every pixel: X = (u - cx) Z / fx, Y = (v - cy) Z / fy, Z = depth.

    Args:
        depth: (B, H, W) camera z (0 where unknown). intrinsics: (B, 3, 3) K in these pixels' coordinates.

    Returns:
        (B, 3, H, W) float32.
    """
    b, h, w = depth.shape
    k = intrinsics.float()
    u, v = pixel_grid(h, w, depth.device)
    z = depth.float()
    fx, fy, cx, cy = (k[:, i, j, None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    return torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], dim=1)


def normals_from_points(points: torch.Tensor) -> torch.Tensor:
    """Unit normals from neighbouring-point differences: n = normalize((P[u+1] - P) x (P[v+1] - P)).

    (B, 3, H, W) -> (B, 3, H - 1, W - 1); oriented towards the camera for surfaces seen from it (OpenCV axes).
    """
    du = points[:, :, :-1, 1:] - points[:, :, :-1, :-1]
    dv = points[:, :, 1:, :-1] - points[:, :, :-1, :-1]
    return F.normalize(torch.cross(du, dv, dim=1), dim=1, eps=1e-12)


class PointmapLoss(nn.Module):
    """The published pointmap loss set (reference sapiens2.md section 3, weights in brackets).

    With valid pixels V (mask & depth > 0), per image mean target depth z_bar, and "normalised" meaning
    ``min(|error| / z_bar, clamp)`` averaged over V (clamp 4):
    - ``l1`` [2]: normalised L1 of XYZ (mean over the 3 axes);
    - ``multiscale`` [1]: the same at 1/2 and 1/4 resolution (masked average pooling), averaged over both
      ("MultiscaleL1 x2" read as two pyramid levels);
    - ``shift_l1`` [1]: normalised L1 after subtracting each image's centroid over V from pred and target;
    - ``silog`` [1]: SiLog (lambda 0.5) on Z;
    - ``k_consistency`` [1]: normalised |X - (u - cx) Z / fx| and |Y - (v - cy) Z / fy| of the prediction;
    - ``normal`` [2]: (1 - cos) + L1 between normals from neighbouring-point differences of pred and target;
    - ``scale`` [4]: |s_pred - s_target|.

    All terms are in canonical units (XYZ times s = f_c / fx), where the intrinsics relation still holds.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        clamp: float = 4.0,
        silog_lambda: float = 0.5,
    ) -> None:
        super().__init__()
        defaults = {
            "l1": 2.0,
            "multiscale": 1.0,
            "shift_l1": 1.0,
            "silog": 1.0,
            "k_consistency": 1.0,
            "normal": 2.0,
            "scale": 4.0,
        }
        unknown = set(weights or {}) - set(defaults)
        if unknown:
            raise ValueError(f"unknown pointmap loss terms {sorted(unknown)}; known: {sorted(defaults)}")
        self.weights = {**defaults, **(weights or {})}
        self.clamp = clamp
        self.silog = SiLogLoss(lambda_=silog_lambda)

    def _normalised(self, error: torch.Tensor, valid: torch.Tensor, z_bar: torch.Tensor) -> torch.Tensor:
        """error (B, C, H, W) -> mean over valid pixels and images of min(|error|.mean(C) / z_bar, clamp)."""
        per_pixel = (error.abs().mean(1) / z_bar[:, None, None]).clamp(max=self.clamp)
        weight = valid.float()
        per_image = (per_pixel * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)
        return per_image.mean()

    def forward(
        self,
        points: torch.Tensor,
        scale: torch.Tensor,
        target: torch.Tensor,
        target_scale: torch.Tensor,
        valid: torch.Tensor,
        intrinsics: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Weighted terms and their sum ``total``.

        Args:
            points: (B, 3, h, w) predicted canonical XYZ; scale: (B, 1) predicted s.
            target: (B, 3, H, W) canonical XYZ; target_scale: (B,) s; valid: (B, H, W) bool.
            intrinsics: (B, 3, 3) K at the label resolution (fx, fy in canonical units do not change).
        """
        points = resize_to(points.float(), tuple(target.shape[-2:]))
        valid = valid.bool()
        w = valid.float()
        z_bar = (target[:, 2] * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)
        z_bar = z_bar.clamp(min=1e-6)
        terms = {"l1": self._normalised(points - target, valid, z_bar)}
        pyramid = []
        for factor in (2, 4):
            pooled_w = F.avg_pool2d(w[:, None], factor)
            safe = pooled_w.clamp(min=1e-6)
            p = F.avg_pool2d(points * w[:, None], factor) / safe
            t = F.avg_pool2d(target * w[:, None], factor) / safe
            pyramid.append(self._normalised(p - t, pooled_w[:, 0] > 0.5, z_bar))
        terms["multiscale"] = torch.stack(pyramid).mean()
        count = w.flatten(1).sum(1).clamp(min=1)[:, None, None, None]
        centre_p = (points * w[:, None]).sum((2, 3), keepdim=True) / count
        centre_t = (target * w[:, None]).sum((2, 3), keepdim=True) / count
        terms["shift_l1"] = self._normalised((points - centre_p) - (target - centre_t), valid, z_bar)
        terms["silog"] = self.silog(points[:, 2:3], target[:, 2], valid)
        u, v = pixel_grid(*target.shape[-2:], target.device)
        k = intrinsics.float()
        fx, fy, cx, cy = (k[:, i, j, None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
        ray = torch.stack([(u - cx) / fx, (v - cy) / fy], dim=1) * points[:, 2:3]
        terms["k_consistency"] = self._normalised(points[:, :2] - ray, valid, z_bar)
        n_pred, n_true = normals_from_points(points), normals_from_points(target)
        trio = valid[:, :-1, :-1] & valid[:, :-1, 1:] & valid[:, 1:, :-1]
        cos = (n_pred * n_true).sum(1)
        per_pixel = (1 - cos) + (n_pred - n_true).abs().mean(1)
        terms["normal"] = (per_pixel * trio.float()).sum() / trio.float().sum().clamp(min=1)
        terms["scale"] = (scale.float().reshape(-1) - target_scale.float().reshape(-1)).abs().mean()
        weighted = {name: self.weights[name] * value for name, value in terms.items()}
        weighted["total"] = torch.stack(list(weighted.values())).sum()
        return weighted
