"""Pointmap (Sapiens2): per-pixel camera-frame XYZ in a canonical camera plus the canonical scale.

Batches: ``image`` (B, 3, H, W), ``depth`` (B, H, W) camera z in metres (0 = unknown), ``mask`` (B, H, W) bool
and ``intrinsics`` (B, 3, 3) K in the input's pixels (pixel centres at integers), all at the network input
size after augmentation (:class:`sapiens.data.dense_transform.DenseTransform` with ``task="pointmap"``).

Targets (published ``PointmapGenerateTarget``): XYZ = ((u - cx) Z / fx, (v - cy) Z / fy, Z), canonicalised by
s = f_c / fx with f_c = 768 at the published 1024x768 input (``canonical_focal``; scale it with the input
width for other sizes). The head regresses canonical XYZ and s; metric XYZ = canonical / s, so depth = Z / s.

Metrics: canonical-XYZ errors (:mod:`sapiens.metrics.pointmap`), normal angles from the points (5x5 Sobel),
and metric depth (Z / predicted s) without alignment: ``depth_rmse`` / ``depth_abs_rel`` / ``depth_delta1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sapiens.losses_sapiens2 import PointmapLoss, points_from_depth
from sapiens.metrics.depth import DepthMetrics
from sapiens.metrics.normals import NormalMetrics
from sapiens.metrics.pointmap import PointmapMetrics, sobel_normals
from sapiens.models.heads_sapiens2 import PointmapHead, PointmapOutput
from sapiens.tasks.base import Task
from sapiens.visualize import colorize, denormalize, normals_to_rgb, tile


class PointmapTask(Task):
    """Published Sapiens2 pointmap head, loss set and metrics.

    Args:
        in_channels: backbone width. image_size: (H, W) of the inputs (sizes the scale branch).
        head: ``fn(in_channels=..., out_channels=3, image_size=...)`` building the head (a Hydra partial of
            :class:`sapiens.models.heads_sapiens2.PointmapHead` with its widths); None = published defaults.
        canonical_focal: f_c in input pixels (768 at 1024x768).
        loss_weights: overrides of :class:`sapiens.losses_sapiens2.PointmapLoss` term weights.
        clamp: the normalised-error clamp (4). silog_lambda: SiLog variance weight (0.5).
    """

    name = "pointmap"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] = (1024, 768),
        head: Callable[..., PointmapHead] | None = None,
        canonical_focal: float = 768.0,
        loss_weights: dict[str, float] | None = None,
        clamp: float = 4.0,
        silog_lambda: float = 0.5,
    ):
        super().__init__()
        self.head = (head or PointmapHead)(
            in_channels=in_channels, out_channels=3, image_size=tuple(image_size)
        )
        self.canonical_focal = float(canonical_focal)
        self.loss_fn = PointmapLoss(loss_weights, clamp, silog_lambda)
        self.metric = PointmapMetrics()
        self.normal_metric = NormalMetrics()
        self.depth_metric = DepthMetrics(min_depth=1e-3, align=False)
        self.loss_terms: dict[str, torch.Tensor] = {}

    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canonical XYZ (B, 3, H, W), canonical scale s = f_c / fx (B,) and valid pixels (B, H, W)."""
        depth = batch["depth"].float()
        intrinsics = batch["intrinsics"].float()
        scale = self.canonical_focal / intrinsics[:, 0, 0]
        points = points_from_depth(depth, intrinsics) * scale[:, None, None, None]
        valid = batch["mask"].bool() & (depth > 0) & torch.isfinite(depth)
        return points, scale, valid

    def loss(self, outputs: PointmapOutput, batch: dict) -> torch.Tensor:
        target, scale, valid = self.targets(batch)
        terms = self.loss_fn(outputs.points, outputs.scale, target, scale, valid, batch["intrinsics"])
        self.loss_terms = {k: v.detach() for k, v in terms.items() if k != "total"}
        return terms["total"]

    def metric_depth(self, outputs: PointmapOutput, size: Sequence[int]) -> torch.Tensor:
        """Metric depth (B, H, W) = predicted canonical Z / predicted scale, resized to ``size``."""
        z = F.interpolate(
            outputs.points[:, 2:3].float(), size=tuple(size), mode="bilinear", align_corners=False
        )
        return z[:, 0] / outputs.scale.float().reshape(-1, 1, 1)

    def update_metrics(self, outputs: PointmapOutput, batch: dict) -> None:
        target, scale, valid = self.targets(batch)
        size = target.shape[-2:]
        points = F.interpolate(outputs.points.float(), size=size, mode="bilinear", align_corners=False)
        self.metric.update(points, target, valid, outputs.scale, scale)
        pred_n, pred_ok = sobel_normals(points, valid)
        true_n, true_ok = sobel_normals(target, valid)
        self.normal_metric.update(pred_n, true_n, pred_ok & true_ok)
        self.depth_metric.update(self.metric_depth(outputs, size), batch["depth"].float(), valid)

    def compute_metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.metric.compute().items()}
        normal = {
            "mean": "mean_angular_error",
            "median": "median_angular_error",
            "rmse": "rmse_angular_error",
        }
        out.update({f"normal_{normal.get(k, k)}": float(v) for k, v in self.normal_metric.compute().items()})
        out.update({f"depth_{k}": float(v) for k, v in self.depth_metric.compute().items()})
        return out

    def reset_metrics(self) -> None:
        self.metric.reset()
        self.normal_metric.reset()
        self.depth_metric.reset()

    # The head's raw output, rebuilt from the tensors of an exported graph (points, scale).
    output_type = PointmapOutput

    @torch.no_grad()
    def decode(self, outputs: PointmapOutput, size: tuple[int, int]) -> torch.Tensor:
        """Raw output -> metric camera-frame XYZ (B, 3, H, W) float32 in metres at ``size`` = (H, W): the
        canonical points resized bilinearly, divided by the predicted canonical scale s (as in training)."""
        points = F.interpolate(outputs.points.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return points / outputs.scale.float().reshape(-1, 1, 1, 1)

    @staticmethod
    def overlay(
        image: np.ndarray,
        points: np.ndarray,
        mask: np.ndarray | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Z of metric points (3, H, W) colour-mapped (near = bright) over ``mask`` (everything when None),
        ``image`` elsewhere; ``value_range``: the (lo, hi) Z in metres mapped onto the colour map (fixed over
        a video), else the foreground's min-max."""
        from sapiens.tasks.depth import DepthTask

        return DepthTask.overlay(image, points[2], mask, value_range)

    def render(self, batch: dict, outputs: PointmapOutput, num: int) -> np.ndarray:
        """Rows of (image | GT depth | predicted metric depth | GT normals | normals of predicted points)."""
        target, _, valid = self.targets(batch)
        size = target.shape[-2:]
        points = F.interpolate(outputs.points[:num].float(), size=size, mode="bilinear", align_corners=False)
        depth = self.metric_depth(PointmapOutput(outputs.points[:num], outputs.scale[:num]), size)
        pred_n, _ = sobel_normals(points, valid[:num])
        true_n, _ = sobel_normals(target[:num], valid[:num])
        rows = []
        for i in range(points.shape[0]):
            mask = valid[i].cpu().numpy()
            rows.append(
                [
                    denormalize(batch["image"][i]),
                    colorize(-batch["depth"][i].float().cpu().numpy(), mask),
                    colorize(-depth[i].cpu().numpy(), mask),
                    normals_to_rgb(true_n[i].cpu().numpy(), mask),
                    normals_to_rgb(pred_n[i].cpu().numpy(), mask),
                ]
            )
        return tile(rows)
