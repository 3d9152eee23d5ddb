"""Dataset-level segmentation metrics with the semantics of mmseg's ``IoUMetric``.

One (C, C) confusion matrix is accumulated over every ``update`` (pixels labelled ``ignore_index``
are dropped) and summed across DDP ranks. From it, per class c:

* IoU_c = TP / (TP + FP + FN); NaN when the class is absent from both prediction and GT.
* Acc_c = TP / (TP + FN) (recall); NaN when the class has no GT pixel.
* mIoU / mAcc = nanmean over classes (background included), aAcc = sum(TP) / #labelled pixels.

This equals torchmetrics ``MulticlassJaccardIndex(average='macro', ignore_index=255)`` and mmseg
``IoUMetric`` (reference data_and_metrics.md 3b). Values are fractions in [0, 1]; the Markdown
table prints percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class SegmentationMetrics(Metric):
    """mIoU, mAcc, aAcc and per-class IoU / Acc from a global confusion matrix.

    Args:
        num_classes: number of classes C (28 for Goliath body parts).
        ignore_index: GT label excluded from every count.
        class_names: C names for the per-class table; defaults to "class_<i>".
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"SegmentationMetrics: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"SegmentationMetrics: {len(class_names)} class_names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        )
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds: (B, H, W) int class ids or (B, C, H, W) logits (argmax taken); target: (B, H, W).

        Logits of another size are bilinearly resized to the target size before the argmax.
        """
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"SegmentationMetrics: logits have {preds.shape[1]} channels, expected {self.num_classes}"
                )
            if preds.shape[-2:] != target.shape[-2:]:
                preds = torch.nn.functional.interpolate(
                    preds.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(
                f"SegmentationMetrics: preds {tuple(preds.shape)} and target "
                f"{tuple(target.shape)} must both be (B, H, W) label maps"
            )
        preds = preds.long().flatten()
        target = target.long().flatten()
        labelled = target != self.ignore_index
        preds, target = preds[labelled], target[labelled]
        c = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise ValueError(f"SegmentationMetrics: target labels must be in [0, {c}) or {self.ignore_index}")
        if preds.numel() and (preds.min() < 0 or preds.max() >= c):
            raise ValueError(f"SegmentationMetrics: predicted labels must be in [0, {c})")
        counts = torch.bincount(target * c + preds, minlength=c * c)
        self.confusion += counts.reshape(c, c).to(self.confusion.device)

    def per_class(self) -> dict[str, torch.Tensor]:
        """Per-class IoU and Acc (C,) float64 with NaN for undefined classes (see module doc)."""
        confusion = self.confusion.double()
        true_positive = confusion.diag()
        gt_area = confusion.sum(dim=1)
        pred_area = confusion.sum(dim=0)
        union = gt_area + pred_area - true_positive
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=confusion.device)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
        acc = torch.where(gt_area > 0, true_positive / gt_area.clamp(min=1), nan)
        return {"IoU": iou, "Acc": acc}

    def compute(self) -> dict[str, torch.Tensor]:
        """-> {"mIoU", "mAcc", "aAcc"} scalar float64 tensors (NaN if nothing was labelled)."""
        scores = self.per_class()
        # 0 / 0 -> NaN when no pixel was labelled.
        a_acc = self.confusion.diag().sum().double() / self.confusion.sum().double()
        return {
            "mIoU": torch.nanmean(scores["IoU"]),
            "mAcc": torch.nanmean(scores["Acc"]),
            "aAcc": a_acc,
        }

    def table_rows(self) -> list[dict[str, float | str]]:
        """One row per class: {"class": name, "IoU": fraction or NaN, "Acc": fraction or NaN}."""
        scores = self.per_class()
        return [
            {"class": name, "IoU": float(scores["IoU"][i]), "Acc": float(scores["Acc"][i])}
            for i, name in enumerate(self.class_names)
        ]

    def markdown_table(self) -> str:
        """Per-class IoU / Acc in percent as a Markdown table (undefined entries print 'n/a')."""

        def fmt(value: float) -> str:
            return "n/a" if value != value else f"{100 * value:.2f}"

        lines = ["| id | class | IoU | Acc |", "|---:|---|---:|---:|"]
        for i, row in enumerate(self.table_rows()):
            lines.append(f"| {i} | {row['class']} | {fmt(row['IoU'])} | {fmt(row['Acc'])} |")
        return "\n".join(lines)
