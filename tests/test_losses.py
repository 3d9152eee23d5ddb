"""Losses: hand-computed values, masking / ignore behaviour, gradients, and a short fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapiens.losses import (
    GOLIATH_CLASS_WEIGHTS,
    KeypointMSELoss,
    KeypointOHKMMSELoss,
    NormalLoss,
    SiLogLoss,
    WeightedCrossEntropy,
    normalize_depth_foreground,
)
from sapiens.models.heads import HeatmapHead, depth_head, normal_head, seg_head


# ----------------------------------------------------------------------------- keypoints
def test_keypoint_mse_hand_computed() -> None:
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])[None]
    weight = torch.tensor([[1.0, 0.0]])
    # masked: (4 * 1 + 0) / 8; unmasked: (4 * 1 + 4 * 4) / 8
    assert float(KeypointMSELoss()(pred, target, weight)) == pytest.approx(0.5)
    assert float(KeypointMSELoss(use_target_weight=False)(pred, target)) == pytest.approx(2.5)
    assert float(KeypointMSELoss()(target, target, weight)) == 0.0


def test_keypoint_mse_requires_weights_of_shape_bk() -> None:
    with pytest.raises(ValueError, match="target_weight"):
        KeypointMSELoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(2))


def test_ohkm_hand_computed() -> None:
    levels = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    target = levels[:, :, None, None].expand(2, 3, 2, 2)
    pred = torch.zeros_like(target)
    loss = KeypointOHKMMSELoss(topk=2)
    # per-keypoint losses (1, 4, 9) and (0, 1, 0); top-2 means 6.5 and 0.5
    assert float(loss(pred, target, torch.ones(2, 3))) == pytest.approx(3.5)
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # sample 0 becomes (1, 4, 0) -> 2.5
    assert float(loss(pred, target, weight)) == pytest.approx(1.5)
    assert float(loss(target, target, torch.ones(2, 3))) == 0.0
    with pytest.raises(ValueError, match="topk"):
        KeypointOHKMMSELoss(topk=4)(pred, target, torch.ones(2, 3))


# ----------------------------------------------------------------------------- segmentation
def test_weighted_cross_entropy_hand_computed() -> None:
    # One logit pixel p(class 1) = 3/4, bilinearly resized to the 1x3 label map.
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    labels = torch.tensor([[[0, 1, 255]]])
    weights = [2.0, 0.5]
    total = 2.0 * math.log(4.0) + 0.5 * math.log(4.0 / 3.0)
    published = WeightedCrossEntropy(weights)(logits, labels)
    assert float(published) == pytest.approx(total / 3)  # all pixels in the denominator
    per_valid = WeightedCrossEntropy(weights, avg_non_ignore=True)(logits, labels)
    assert float(per_valid) == pytest.approx(total / 2)


def test_weighted_cross_entropy_ignores_ignored_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 28, 8, 6, generator=gen, requires_grad=True)
    labels = torch.randint(0, 28, (2, 8, 6), generator=gen)
    labels[:, :3] = 255
    loss_fn = WeightedCrossEntropy(GOLIATH_CLASS_WEIGHTS)
    loss = loss_fn(logits, labels)
    loss.backward()
    assert torch.all(logits.grad[:, :, :3] == 0)
    assert torch.any(logits.grad[:, :, 3:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, 28, 3, 6, generator=gen) * 10
    assert float(loss_fn(changed, labels)) == pytest.approx(loss.item())


def test_weighted_cross_entropy_resizes_logits_and_checks_labels() -> None:
    logits = torch.randn(1, 28, 4, 3, requires_grad=True)
    labels = torch.randint(0, 28, (1, 16, 12))
    loss = WeightedCrossEntropy(GOLIATH_CLASS_WEIGHTS)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels must be in"):
        WeightedCrossEntropy()(logits, torch.full((1, 16, 12), 30))
    with pytest.raises(ValueError, match="class weights"):
        WeightedCrossEntropy([1.0, 2.0])(logits, labels)


def test_goliath_class_weights_match_reference() -> None:
    # Reference sapiens.md 3b, copied from the published config text.
    published = "0.1, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2, 6, 10, 3, 3, 1, 1, 10, 10, 10, 10, 10"
    assert list(GOLIATH_CLASS_WEIGHTS) == [float(v) for v in published.split(",")]


# ----------------------------------------------------------------------------- depth
def test_silog_hand_computed_and_zero_at_target() -> None:
    loss = SiLogLoss()
    # valid pixels t = (1, 1), p = (1, e): d = (0, -1); 0.5 - 0.5 * 0.25 = 0.375
    target = torch.tensor([[[1.0, 1.0, -1.0, 0.0]]])  # -1 background and 0 are excluded
    pred = torch.tensor([[[1.0, math.e, 5.0, 7.0]]])
    assert float(loss(pred, target)) == pytest.approx(math.sqrt(0.375), rel=1e-5)
    # a pure scale error d = -ln 2 everywhere gives ln2 * sqrt(1 - 0.5)
    t = torch.rand(2, 4, 4) + 0.5
    assert float(loss(2 * t, t)) == pytest.approx(math.log(2) * math.sqrt(0.5), rel=1e-5)
    p = t.clone().requires_grad_(True)
    value = loss(p, t)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(p.grad).all()


def test_silog_is_a_mean_over_images_and_respects_mask() -> None:
    loss = SiLogLoss()
    target = torch.ones(2, 1, 2)
    pred = torch.tensor([[[1.0, math.e]], [[1.0, 1.0]]])
    assert float(loss(pred, target)) == pytest.approx(math.sqrt(0.375) / 2, rel=1e-5)
    mask = torch.tensor([[[True, False]], [[True, True]]])
    assert float(loss(pred, target, mask)) == pytest.approx(0.0, abs=1e-6)
    empty = loss(pred.requires_grad_(True), -torch.ones(2, 1, 2))
    assert empty.item() == 0.0 and empty.requires_grad


def test_silog_resizes_prediction_and_gradients_flow() -> None:
    pred = (torch.rand(2, 1, 4, 3) + 0.1).requires_grad_(True)
    target = torch.rand(2, 16, 12) + 0.1
    value = SiLogLoss()(pred, target)
    value.backward()
    assert value > 0 and pred.grad.abs().sum() > 0


def test_normalize_depth_foreground_hand_computed() -> None:
    depth = torch.tensor([[2.0, 4.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = normalize_depth_foreground(depth[None], mask[None])[0]
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0], [0.5, -1.0]]))
    empty = normalize_depth_foreground(depth, torch.zeros(2, 2, dtype=torch.bool))
    assert torch.all(empty == -1)
    with pytest.raises(ValueError, match="depth"):
        normalize_depth_foreground(depth, mask[0])


# ----------------------------------------------------------------------------- normals
def test_normal_loss_hand_computed() -> None:
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    y = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    loss = NormalLoss()
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(2 * x, x)) == pytest.approx(1 / 3, rel=1e-5)  # cosine 0, L1 (1+0+0)/3
    assert float(loss(y, x)) == pytest.approx(1 + 2 / 3, rel=1e-5)  # cosine 1, L1 (1+1+0)/3


def test_normal_loss_masks_background_and_survives_zero_predictions() -> None:
    target = torch.tensor([[1.0, -1000.0], [0.0, -1000.0], [0.0, -1000.0]]).view(1, 3, 1, 2)
    pred = torch.tensor([[1.0, 9.0], [0.0, 9.0], [0.0, 9.0]]).view(1, 3, 1, 2)
    assert float(NormalLoss()(pred, target)) == pytest.approx(0.0, abs=1e-6)
    target2 = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    assert float(NormalLoss()(pred, target2, torch.tensor([[[True, False]]]))) == pytest.approx(0.0, abs=1e-6)
    zero = torch.zeros(1, 3, 2, 2, requires_grad=True)
    value = NormalLoss()(zero, torch.ones(1, 3, 4, 4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zero.grad).all()


# ----------------------------------------------------------------------------- short fits
def _fit(head: torch.nn.Module, compute_loss, steps: int = 30) -> tuple[float, float]:
    torch.manual_seed(0)
    features = torch.randn(2, 16, 4, 3)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = compute_loss(head(features))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_training_steps_lower_each_loss() -> None:
    torch.manual_seed(1)
    heatmaps = torch.rand(2, 5, 16, 12)
    weights = torch.ones(2, 5)
    first, last = _fit(
        HeatmapHead(16, 5, (16, 16), (16,)), lambda out: KeypointMSELoss()(out, heatmaps, weights)
    )
    assert last < 0.5 * first

    labels = torch.randint(0, 4, (2, 64, 48))
    labels[:, :8] = 255
    first, last = _fit(
        seg_head(16, 4, (16,) * 3, (16,), dropout=0.0),
        lambda out: WeightedCrossEntropy([0.1, 1.0, 2.0, 3.0])(out, labels),
    )
    assert last < 0.9 * first

    depth = torch.rand(2, 64, 48) + 0.2
    first, last = _fit(depth_head(16, (8,) * 4, (8,), dropout=0.0), lambda out: SiLogLoss()(out, depth))
    assert last < 0.7 * first

    normals = torch.nn.functional.normalize(torch.randn(2, 3, 32, 24), dim=1)
    first, last = _fit(normal_head(16, (16,) * 3, (16,), dropout=0.0), lambda out: NormalLoss()(out, normals))
    assert last < 0.7 * first


def test_scale_shift_invariant_loss_is_the_rmse_left_after_a_per_image_least_squares_fit():
    from sapiens.losses_depth import ScaleShiftInvariantLoss

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 10, 8, generator=gen)
    pred = torch.rand(3, 1, 10, 8, generator=gen)
    mask = torch.rand(3, 10, 8, generator=gen) > 0.3
    mask[2] = False  # an image without foreground is left out of the mean
    loss = ScaleShiftInvariantLoss()
    expected = []
    for i in range(2):  # independent: numpy least squares on the valid pixels
        p, g = pred[i, 0][mask[i]].double().numpy(), target[i][mask[i]].double().numpy()
        design = np.stack([p, np.ones_like(p)], axis=1)
        (s, t), *_ = np.linalg.lstsq(design, g, rcond=None)
        expected.append(np.sqrt(np.mean((s * p + t - g) ** 2)))
    assert float(loss(pred, target, mask)) == pytest.approx(np.mean(expected), rel=1e-5)
    # what the fit removes costs nothing: any scale and shift of the prediction, an exact affine copy
    assert float(loss(-3.0 * pred + 7.0, target, mask)) == pytest.approx(np.mean(expected), rel=1e-4)
    assert float(loss(2.0 * target[:, None] - 0.5, target, mask)) < 1e-5
    # masked-out pixels do not matter
    noisy = torch.where(mask[:, None], pred, torch.full_like(pred, 1e3))
    assert float(loss(noisy, target, mask)) == pytest.approx(float(loss(pred, target, mask)), rel=1e-5)
    pred.requires_grad_(True)
    loss(pred, target, mask).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert float(loss(pred.detach(), target, torch.zeros_like(mask))) == 0.0


def test_depth_task_takes_its_loss_from_the_config():
    from sapiens.losses_depth import ScaleShiftInvariantLoss
    from sapiens.tasks.depth import DepthTask

    assert isinstance(DepthTask(8, loss="scale_shift").loss_fn, ScaleShiftInvariantLoss)
    assert isinstance(DepthTask(8).loss_fn, SiLogLoss)
    with pytest.raises(ValueError, match=r"task.task_head.loss='l2'.*scale_shift"):
        DepthTask(8, loss="l2")
