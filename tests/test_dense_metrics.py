"""Segmentation, depth and normal metrics: hand-computed cases and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from sapiens.metrics.depth import DepthMetrics, align_scale_shift
from sapiens.metrics.normals import NormalMetrics
from sapiens.metrics.segmentation import SegmentationMetrics


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_hand_computed_2x2() -> None:
    metric = SegmentationMetrics(3, class_names=["bg", "a", "b"])
    metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 0], [1, 255]]]))
    result = metric.compute()
    # confusion (gt, pred): (0,0)=1, (0,1)=1, (1,1)=1; class 2 absent everywhere
    assert float(result["mIoU"]) == pytest.approx(0.5)  # IoU0 = 1/2, IoU1 = 1/2
    assert float(result["mAcc"]) == pytest.approx(0.75)  # Acc0 = 1/2, Acc1 = 1
    assert float(result["aAcc"]) == pytest.approx(2 / 3)
    rows = metric.table_rows()
    assert [r["class"] for r in rows] == ["bg", "a", "b"]
    assert math.isnan(rows[2]["IoU"]) and math.isnan(rows[2]["Acc"])
    table = metric.markdown_table()
    assert "| 2 | b | n/a | n/a |" in table and "| 0 | bg | 50.00 | 50.00 |" in table


def test_segmentation_class_only_predicted_has_zero_iou_and_no_acc() -> None:
    metric = SegmentationMetrics(3)
    metric.update(torch.tensor([[[2, 0]]]), torch.tensor([[[0, 0]]]))
    scores = metric.per_class()
    assert float(scores["IoU"][2]) == 0.0 and math.isnan(float(scores["Acc"][2]))
    assert float(metric.compute()["mIoU"]) == pytest.approx(0.25)  # (1/2 + 0) / 2


def _numpy_reference(preds: np.ndarray, target: np.ndarray, num_classes: int, ignore: int):
    keep = target != ignore
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (target[keep], preds[keep]), 1)
    tp = np.diag(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
        acc = tp / confusion.sum(1)
    return np.nanmean(iou), np.nanmean(acc), tp.sum() / keep.sum(), iou


def test_segmentation_matches_numpy_and_torchmetrics_on_random_data() -> None:
    gen = torch.Generator().manual_seed(0)
    num_classes = 28
    metric = SegmentationMetrics(num_classes)
    jaccard = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)
    all_preds, all_targets = [], []
    for _ in range(3):
        target = torch.randint(0, num_classes - 1, (2, 16, 12), generator=gen)  # 27 never in GT
        preds = torch.where(
            torch.rand(target.shape, generator=gen) < 0.6,
            target,
            torch.randint(0, num_classes - 1, target.shape, generator=gen),
        )  # 27 never predicted either: absent class
        target[torch.rand(target.shape, generator=gen) < 0.1] = 255
        metric.update(preds, target)
        jaccard.update(preds, target)
        all_preds.append(preds.numpy())
        all_targets.append(target.numpy())
    miou, macc, aacc, iou = _numpy_reference(
        np.concatenate(all_preds), np.concatenate(all_targets), num_classes, 255
    )
    result = metric.compute()
    assert math.isnan(iou[27]) and math.isnan(float(metric.per_class()["IoU"][27]))
    assert float(result["mIoU"]) == pytest.approx(miou, abs=1e-12)
    assert float(result["mAcc"]) == pytest.approx(macc, abs=1e-12)
    assert float(result["aAcc"]) == pytest.approx(aacc, abs=1e-12)
    assert float(result["mIoU"]) == pytest.approx(float(jaccard.compute()), abs=1e-6)


def test_segmentation_accepts_logits_and_merges_states() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 8, 6, generator=gen)
    target = torch.randint(0, 5, (4, 8, 6), generator=gen)
    full = SegmentationMetrics(5)
    full.update(logits, target)
    labels = SegmentationMetrics(5)
    labels.update(logits.argmax(1), target)
    assert torch.equal(full.confusion, labels.confusion)
    first, second = SegmentationMetrics(5), SegmentationMetrics(5)
    first.update(logits[:2], target[:2])
    second.update(logits[2:], target[2:])
    first.merge_state(second)  # what a DDP sync does with dist_reduce_fx="sum"
    assert torch.equal(first.confusion, full.confusion)


def test_segmentation_rejects_bad_labels() -> None:
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="target labels"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="label maps"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------- depth
def test_alignment_recovers_scale_and_shift_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 8, 6, generator=gen, dtype=torch.float64) * 4 + 1
    scale = torch.tensor([0.5, 2.0, 3.7], dtype=torch.float64)
    shift = torch.tensor([1.0, -0.3, 0.2], dtype=torch.float64)
    pred = (gt - shift[:, None, None]) / scale[:, None, None]
    valid = torch.rand(3, 8, 6, generator=gen) < 0.7
    s, t = align_scale_shift(pred, gt, valid)
    torch.testing.assert_close(s, scale)
    torch.testing.assert_close(t, shift)

    metric = DepthMetrics()
    pred_with_junk = torch.where(valid, pred, torch.full_like(pred, 1e3))  # background ignored
    metric.update(pred_with_junk.float(), gt.float(), valid)
    result = metric.compute()
    assert float(result["rmse"]) < 1e-5 and float(result["abs_rel"]) < 1e-6
    assert float(result["delta1"]) == 1.0 and int(metric.num_images) == 3


def test_depth_fit_matches_numpy_polyfit() -> None:
    gt = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pred = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    s, t = align_scale_shift(pred, gt, torch.ones_like(gt, dtype=torch.bool))
    ref_s, ref_t = np.polyfit(pred.flatten().numpy(), gt.flatten().numpy(), 1)
    assert float(s[0]) == pytest.approx(ref_s) and float(t[0]) == pytest.approx(ref_t)


def test_depth_constant_prediction_hand_computed() -> None:
    gt = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    metric = DepthMetrics()
    metric.update(torch.full((1, 1, 2, 2), 0.3), gt, torch.ones(1, 2, 2, dtype=torch.bool))
    result = metric.compute()
    # aligned = mean(gt) = 2.5 everywhere; ratios 2.5, 1.25, 1.2, 1.6
    assert float(result["rmse"]) == pytest.approx(math.sqrt(1.25))
    assert float(result["abs_rel"]) == pytest.approx((1.5 + 0.25 + 0.5 / 3 + 1.5 / 4) / 4)
    assert float(result["delta1"]) == pytest.approx(0.25)  # 1.25 is not < 1.25
    assert float(result["delta2"]) == pytest.approx(0.5)
    assert float(result["delta3"]) == pytest.approx(0.75)


def test_depth_metrics_average_per_image_not_per_pixel() -> None:
    gt = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 3.0, 5.0, 5.0]]])
    mask = torch.tensor([[[True, True, True, True]], [[True, True, False, False]]])
    metric = DepthMetrics()
    metric.update(torch.full((2, 1, 4), 0.5), gt, mask)
    # image 1: RMSE sqrt(1.25); image 2: aligned 2, RMSE 1 (2 valid pixels)
    assert float(metric.compute()["rmse"]) == pytest.approx((math.sqrt(1.25) + 1.0) / 2)


def test_depth_skips_images_without_foreground_and_resizes_pred() -> None:
    metric = DepthMetrics()
    gt = torch.rand(2, 8, 6) + 1
    mask = torch.zeros(2, 8, 6, dtype=torch.bool)
    mask[0] = True
    metric.update(torch.rand(2, 1, 4, 3), gt, mask)
    assert int(metric.num_images) == 1 and torch.isfinite(metric.compute()["rmse"])
    with pytest.raises(ValueError, match="mask"):
        metric.update(torch.rand(2, 8, 6), gt, mask[:, :4])


# ----------------------------------------------------------------------------- normals
def _unit(angle_deg: torch.Tensor) -> torch.Tensor:
    """(N,) angles in the x-y plane -> (1, 3, 1, N) unit vectors."""
    a = torch.deg2rad(angle_deg.double())
    return torch.stack([a.cos(), a.sin(), torch.zeros_like(a)])[None, :, None, :]


def test_normals_identical_give_zero_error() -> None:
    gen = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(2, 3, 8, 6, generator=gen), dim=1)
    metric = NormalMetrics()
    metric.update(3 * n, n)  # length of the prediction does not matter
    result = metric.compute()
    # float32 inputs: rounding leaves ~1e-6 degree
    assert float(result["mean"]) < 1e-4 and float(result["median"]) < 0.01
    assert float(result["rmse"]) < 1e-4
    for key in ("within_11.25", "within_22.5", "within_30"):
        assert float(result[key]) == 100.0


def test_normals_right_angle_and_hand_computed_mix() -> None:
    metric = NormalMetrics()
    metric.update(_unit(torch.tensor([90.0, 90.0])), _unit(torch.tensor([0.0, 0.0])))
    result = metric.compute()
    assert float(result["mean"]) == pytest.approx(90.0)
    assert float(result["median"]) == pytest.approx(90.0, abs=0.01)
    assert float(result["within_30"]) == 0.0

    angles = torch.tensor([0.0, 20.0, 45.0, 90.0, 90.0])
    metric = NormalMetrics()
    metric.update(_unit(angles), _unit(torch.zeros(5)))
    result = metric.compute()
    assert float(result["mean"]) == pytest.approx(49.0)
    assert float(result["median"]) == pytest.approx(45.0, abs=0.01)
    assert float(result["rmse"]) == pytest.approx(math.sqrt((400 + 2025 + 2 * 8100) / 5))
    assert float(result["within_11.25"]) == pytest.approx(20.0)
    assert float(result["within_22.5"]) == pytest.approx(40.0)
    assert float(result["within_30"]) == pytest.approx(40.0)


def test_normals_mask_and_zero_vectors_are_excluded() -> None:
    pred = torch.cat([_unit(torch.tensor([0.0, 90.0])), torch.zeros(1, 3, 1, 1)], dim=3)
    target = _unit(torch.zeros(3))
    metric = NormalMetrics()
    metric.update(pred, target, torch.tensor([[[True, False, True]]]))
    result = metric.compute()
    assert int(metric.num_pixels) == 1 and float(result["mean"]) < 1e-6


def test_normals_median_matches_numpy_over_several_updates() -> None:
    gen = torch.Generator().manual_seed(3)
    metric = NormalMetrics()
    errors = []
    for _ in range(3):
        angles = torch.rand(501, generator=gen, dtype=torch.float64) * 120
        metric.update(_unit(angles), _unit(torch.zeros(501)))
        errors.append(angles.numpy())
    errors = np.concatenate(errors)
    result = metric.compute()
    assert float(result["median"]) == pytest.approx(np.median(errors), abs=0.01)
    assert float(result["mean"]) == pytest.approx(errors.mean(), abs=1e-6)
    assert float(result["within_22.5"]) == pytest.approx(100 * (errors < 22.5).mean())
