"""Surface normals: 3-channel output at stride 2, cosine + L1 loss on the foreground, angular-error
metrics (mean, median, % within 11.25 / 22.5 / 30 degrees). Sapiens2: the pixel-shuffle head at stride 1
(``head``) and cosine (10) + L1 (1) + finite-difference (10) loss weights.

Batches: ``image`` (B, 3, H, W), ``normal`` (B, 3, H, W) unit camera-space normals, ``mask`` (B, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sapiens.losses import NormalLoss
from sapiens.losses_sapiens2 import NormalGradientLoss
from sapiens.metrics.normals import NormalMetrics
from sapiens.models.heads import SEG_CONV_CHANNELS, SEG_DECONV_CHANNELS, DenseHead
from sapiens.tasks.base import Task
from sapiens.visualize import denormalize, normals_to_rgb, paste_foreground, tile


class NormalTask(Task):
    """Published ``VitNormalHead`` (as the seg head, 3 outputs); predictions are normalised for metrics.

    Args:
        in_channels: backbone width.
        image_size: (H, W) input size (unused; part of the common task signature).
        deconv_channels, conv_channels, dropout: head shape.
        head: ``fn(in_channels, out_channels)`` building another head (a Hydra partial, e.g.
            :class:`sapiens.models.heads_sapiens2.NormalHead`); None = ``DenseHead`` with the widths above.
        cosine_weight, l1_weight: weights of the cosine and L1 terms (Sapiens 1 / 1, Sapiens2 10 / 1).
        grad_weight: weight of the finite-difference MSE term (Sapiens2 10; 0 = off).
    """

    name = "normal"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] = (1024, 768),
        deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
        conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
        dropout: float = 0.1,
        head: Callable[..., torch.nn.Module] | None = None,
        cosine_weight: float = 1.0,
        l1_weight: float = 1.0,
        grad_weight: float = 0.0,
    ):
        super().__init__()
        if head is None:
            self.head = DenseHead(in_channels, 3, tuple(deconv_channels), tuple(conv_channels), dropout)
        else:
            self.head = head(in_channels=in_channels, out_channels=3)
        self.loss_fn = NormalLoss(cosine_weight, l1_weight)
        self.grad_loss = NormalGradientLoss() if grad_weight else None
        self.grad_weight = grad_weight
        self.metric = NormalMetrics()

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        loss = self.loss_fn(outputs, batch["normal"], batch["mask"])
        if self.grad_loss is None:
            return loss
        return loss + self.grad_weight * self.grad_loss(outputs, batch["normal"], batch["mask"])

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

    @torch.no_grad()
    def decode(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Raw normals (B, 3, h, w) -> unit normals (B, 3, H, W) at ``size`` = (H, W), resized bilinearly
        then normalised (as published)."""
        pred = outputs.float().contiguous(memory_format=torch.channels_last)  # contiguous vectors
        pred = torch.nn.functional.interpolate(pred, size=tuple(size), mode="bilinear")
        return torch.nn.functional.normalize(pred, dim=1).contiguous()

    @staticmethod
    def overlay(image: np.ndarray, normals: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Normals (3, H, W) as RGB = (n + 1) / 2 over ``mask`` (all when None), ``image`` elsewhere."""
        mask = np.ones(normals.shape[1:], bool) if mask is None else mask
        return paste_foreground(image, normals_to_rgb(normals, mask), mask)

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """Rows of (image | ground-truth normals | predicted normals) as RGB = (n + 1) / 2."""
        pred = self.decode(outputs[:num], batch["normal"].shape[-2:])
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
