"""Relative depth: 1-channel output at stride 1, SiLog loss on foreground-normalised targets, and
RMSE / AbsRel / delta<1.25 after per-image least-squares scale-and-shift alignment on the foreground.

Batches: ``image`` (B, 3, H, W), ``depth`` (B, H, W) camera z (0 on background), ``mask`` (B, H, W) bool.
Training target (published ``GenerateDepthTarget``): per image, foreground depth min-max normalised to
[0, 1], background -1. Metrics compare the aligned prediction with the raw camera depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sapiens.losses import SiLogLoss, normalize_depth_foreground
from sapiens.losses_depth import ScaleShiftInvariantLoss
from sapiens.metrics.depth import DepthMetrics
from sapiens.models.heads import DEPTH_CONV_CHANNELS, DEPTH_DECONV_CHANNELS, DenseHead
from sapiens.tasks.base import Task
from sapiens.visualize import colorize, denormalize, paste_foreground, tile


class DepthTask(Task):
    """Published ``VitDepthHead`` (4 deconvs of 384, 2 convs, dropout 0.1, 1x1 conv to 1 channel).

    Args:
        in_channels: backbone width.
        image_size: (H, W) input size (unused; part of the common task signature).
        silog_lambda: variance weight of the SiLog loss (published 0.5).
        loss: ``silog`` (published) or ``scale_shift``: the RMSE left after the metric's per-image
            least-squares scale and shift (``ScaleShiftInvariantLoss``).
        deconv_channels, conv_channels, dropout: head shape.
    """

    name = "depth"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] = (1024, 768),
        silog_lambda: float = 0.5,
        deconv_channels: Sequence[int] = DEPTH_DECONV_CHANNELS,
        conv_channels: Sequence[int] = DEPTH_CONV_CHANNELS,
        dropout: float = 0.1,
        loss: str = "silog",
    ):
        super().__init__()
        losses = {"silog": lambda: SiLogLoss(lambda_=silog_lambda), "scale_shift": ScaleShiftInvariantLoss}
        if loss not in losses:
            raise ValueError(f"task.task_head.loss={loss!r}: expected one of {sorted(losses)}")
        self.head = DenseHead(in_channels, 1, tuple(deconv_channels), tuple(conv_channels), dropout)
        self.loss_fn = losses[loss]()
        self.metric = DepthMetrics()

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        target = normalize_depth_foreground(batch["depth"], batch["mask"])
        return self.loss_fn(outputs, target, batch["mask"])

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        self.metric.update(outputs, batch["depth"], batch["mask"])

    def compute_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metric.compute().items()}

    def reset_metrics(self) -> None:
        self.metric.reset()

    @torch.no_grad()
    def decode(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Depth (B, 1, h, w) -> (B, H, W) float32 at ``size`` = (H, W), resized bilinearly; relative
        depth as trained (foreground min-max normalised: larger = farther)."""
        return torch.nn.functional.interpolate(outputs.float(), size=tuple(size), mode="bilinear")[:, 0]

    @staticmethod
    def overlay(
        image: np.ndarray,
        depth: np.ndarray,
        mask: np.ndarray | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Colour-mapped depth (near = bright) over ``mask`` (everything when None), ``image`` elsewhere.

        ``value_range``: the (lo, hi) depth mapped onto the colour map (fixed over a video), else the
        foreground's min-max."""
        mask = np.ones(depth.shape, bool) if mask is None else mask
        if value_range is not None:
            value_range = (-value_range[1], -value_range[0])
        return paste_foreground(image, colorize(-depth, mask, value_range), mask)

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """Rows of (image | ground-truth depth | predicted depth), near = bright, background black."""
        pred = self.decode(outputs[:num], batch["depth"].shape[-2:])
        rows = []
        for i in range(pred.shape[0]):
            mask = batch["mask"][i].cpu().numpy()
            rows.append(
                [
                    denormalize(batch["image"][i]),
                    colorize(-batch["depth"][i].cpu().numpy(), mask),
                    colorize(-pred[i].cpu().numpy(), mask),
                ]
            )
        return tile(rows)
