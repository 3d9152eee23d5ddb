"""Body-part segmentation: 28-class logits at stride 2, class-weighted cross-entropy, mIoU / mAcc (Sapiens);
29 classes at stride 1 with class-weighted CE + Dice (Sapiens2: ``head`` + ``dice_weight``).

Batches: ``image`` (B, 3, H, W) and ``seg`` (B, H, W) int64 class ids with 255 = ignore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sapiens.labels import load_class_list
from sapiens.losses import GOLIATH_CLASS_WEIGHTS, WeightedCrossEntropy, resize_to
from sapiens.losses_ce_dice import cross_entropy_dice
from sapiens.losses_sapiens2 import SAPIENS2_CLASS_WEIGHTS, DiceLoss
from sapiens.metrics.segmentation import SegmentationMetrics
from sapiens.models.heads import SEG_CONV_CHANNELS, SEG_DECONV_CHANNELS, DenseHead
from sapiens.tasks.base import Task
from sapiens.visualize import blend, denormalize, tile


class SegmentationTask(Task):
    """Published ``VitHead`` segmentation with weighted CE (ignore 255).

    Args:
        in_channels: backbone width.
        image_size: (H, W) input size (unused; part of the common task signature).
        class_list: name or YAML path of the classes (goliath_parts28, sapiens2_parts29).
        class_weight: per-class CE weights; ``goliath`` / ``sapiens2``: the published ones, None: uniform.
        deconv_channels, conv_channels, dropout: head shape (published 768 x3, 768 x3, 0.1).
        head: ``fn(in_channels, out_channels)`` building another head (a Hydra partial); None = ``DenseHead``
            with the widths above.
        dice_weight: weight of a softmax Dice term over the foreground classes (Sapiens2: 1.0; 0 = off).
    """

    name = "seg"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] = (1024, 768),
        class_list: str = "goliath_parts28",
        class_weight: str | Sequence[float] | None = "goliath",
        deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
        conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
        dropout: float = 0.1,
        head: Callable[..., torch.nn.Module] | None = None,
        dice_weight: float = 0.0,
    ):
        super().__init__()
        self.classes = load_class_list(class_list)
        n = self.classes.num_classes
        if head is None:
            self.head = DenseHead(in_channels, n, tuple(deconv_channels), tuple(conv_channels), dropout)
        else:
            self.head = head(in_channels=in_channels, out_channels=n)
        published = {"goliath": GOLIATH_CLASS_WEIGHTS, "sapiens2": SAPIENS2_CLASS_WEIGHTS}
        weights = list(published[class_weight]) if class_weight in published else class_weight
        if weights is not None and len(weights) != n:
            raise ValueError(f"class_weight has {len(weights)} entries for {n} classes")
        self.loss_fn = WeightedCrossEntropy(class_weight=weights, ignore_index=255)
        self.dice = DiceLoss(ignore_index=255, loss_weight=dice_weight) if dice_weight else None
        self.metric = SegmentationMetrics(n, ignore_index=255, class_names=self.classes.names)

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["seg"]
        if self.dice is None:
            return self.loss_fn(outputs, labels)
        # One resize, one softmax and a written-out gradient for both terms (sapiens.losses_ce_dice):
        # autograd through the two took a third of a demo seg step.
        ce = self.loss_fn
        return cross_entropy_dice(
            resize_to(outputs.float(), tuple(labels.shape[-2:])),
            ce.checked_labels(labels, outputs.shape[1]),
            ce.class_weight,
            ce.ignore_index,
            ce.avg_non_ignore,
            ce_weight=ce.loss_weight,
            dice_weight=self.dice.loss_weight,
            smooth=self.dice.smooth,
        )

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        self.metric.update(outputs, batch["seg"])

    def compute_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metric.compute().items()}

    def report(self) -> str:
        """Markdown table of per-class IoU / Acc of the last computed validation, from the confusion
        matrix summed over all ranks (a collective: every rank calls this, as the module does)."""
        with self.metric.sync_context():
            return self.metric.markdown_table()

    def reset_metrics(self) -> None:
        self.metric.reset()

    @torch.no_grad()
    def decode(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits (B, N, h, w) -> class ids (B, H, W) int64 at ``size`` = (H, W): logits resized
        bilinearly (as published), then argmax. Runs on the logits' device."""
        # Channels-last makes the argmax over classes a contiguous reduction (2-3x faster on CPU).
        logits = outputs.float().contiguous(memory_format=torch.channels_last)
        logits = torch.nn.functional.interpolate(logits, size=tuple(size), mode="bilinear")
        return logits.argmax(1)

    def overlay(self, image: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
        """The class palette of ``labels`` (H, W) blended over ``image`` (H, W, 3) uint8."""
        palette = np.asarray(self.classes.palette, np.uint8)
        return blend(image, palette[labels], alpha)

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """Rows of (image | ground-truth parts | predicted parts), palette blended over the image."""
        pred = self.decode(outputs[:num], batch["seg"].shape[-2:]).cpu().numpy()
        rows = []
        for i in range(pred.shape[0]):
            image = denormalize(batch["image"][i])
            gt = batch["seg"][i].cpu().numpy()
            rows.append(
                [image, self.overlay(image, np.where(gt == 255, 0, gt)), self.overlay(image, pred[i])]
            )
        return tile(rows)
