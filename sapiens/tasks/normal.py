"""Surface normals: 3-channel output at stride 2, cosine + L1 loss on the foreground, angular-error
metrics (mean, median, % within 11.25 / 22.5 / 30 degrees).

Batches: ``image`` (B, 3, H, W), ``normal`` (B, 3, H, W) unit camera-space normals, ``mask`` (B, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sapiens.losses import NormalLoss
from sapiens.metrics.normals import NormalMetrics
from sapiens.models.heads import SEG_CONV_CHANNELS, SEG_DECONV_CHANNELS, DenseHead
from sapiens.tasks.base import Task
from sapiens.visualize import denormalize, normals_to_rgb, tile


class NormalTask(Task):
    """Published ``VitNormalHead`` (as the seg head, 3 outputs); predictions are normalised for metrics.

    Args:
        in_channels: backbone width.
        image_size: (H, W) input size (unused; part of the common task signature).
        deconv_channels, conv_channels, dropout: head shape.
    """

    name = "normal"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] = (1024, 768),
        deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
        conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.head = DenseHead(in_channels, 3, tuple(deconv_channels), tuple(conv_channels), dropout)
        self.loss_fn = NormalLoss()
        self.metric = NormalMetrics()

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.loss_fn(outputs, batch["normal"], batch["mask"])

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        self.metric.update(outputs, batch["normal"], batch["mask"])

    def compute_metrics(self) -> dict[str, float]:
        """Angular errors in degrees (``*_angular_error``) and % of pixels ``within_<deg>``."""
        renamed = {
            "mean": "mean_angular_error",
            "median": "median_angular_error",
            "rmse": "rmse_angular_error",
        }
        return {renamed.get(k, k): float(v) for k, v in self.metric.compute().items()}

    def reset_metrics(self) -> None:
        self.metric.reset()

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """Rows of (image | ground-truth normals | predicted normals) as RGB = (n + 1) / 2."""
        size = batch["normal"].shape[-2:]
        pred = torch.nn.functional.interpolate(outputs[:num].float(), size=size, mode="bilinear")
        pred = torch.nn.functional.normalize(pred, dim=1)
        rows = []
        for i in range(pred.shape[0]):
            mask = batch["mask"][i].cpu().numpy()
            rows.append(
                [
                    denormalize(batch["image"][i]),
                    normals_to_rgb(batch["normal"][i].cpu().numpy(), mask),
                    normals_to_rgb(pred[i].cpu().numpy(), mask),
                ]
            )
        return tile(rows)
