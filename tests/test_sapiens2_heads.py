"""Sapiens2 heads (published names, shapes, strides), the new losses and the linear schedule."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from sapiens.labels import load_class_list
from sapiens.losses_sapiens2 import SAPIENS2_CLASS_WEIGHTS, DiceLoss, NormalGradientLoss
from sapiens.models.heads import DenseHead
from sapiens.models.heads_sapiens2 import NormalHead, PointmapHead, PoseHeatmapHead, identify_head
from sapiens.optim import ScheduleConfig
from sapiens.tasks.normal import NormalTask
from sapiens.tasks.pose import PoseTask
from sapiens.tasks.segmentation import SegmentationTask


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_heads_have_the_published_keys_and_shapes():
    """Reference sapiens2.md section 2, built on the meta device: 1B pose, seg, normal and pointmap heads."""
    with torch.device("meta"):
        pose = PoseHeatmapHead(1536, 308, (1536, 1024), (768, 512, 256))
        seg = DenseHead(1536, 29, (512, 256, 128, 64), (64, 64), dropout=0.0)
        normal = NormalHead(1536)
        pointmap = PointmapHead(1536)
    assert shapes(pose) == {
        "deconv_layers.0.weight": (1536, 1536, 4, 4),
        "deconv_layers.3.weight": (1536, 1024, 4, 4),
        "conv_layers.0.weight": (768, 1024, 1, 1),
        "conv_layers.0.bias": (768,),
        "conv_layers.3.weight": (512, 768, 1, 1),
        "conv_layers.3.bias": (512,),
        "conv_layers.6.weight": (256, 512, 1, 1),
        "conv_layers.6.bias": (256,),
        "conv_pose.weight": (308, 256, 1, 1),
        "conv_pose.bias": (308,),
    }
    weights = [f"deconv_layers.{i}.weight" for i in (0, 3, 6, 9)] + ["conv_layers.0.weight"]
    assert [k for k in shapes(seg) if k.endswith("weight")] == [
        *weights,
        "conv_layers.3.weight",
        "conv_seg.weight",
    ]
    assert shapes(seg)["conv_seg.weight"] == (29, 64, 1, 1)
    n = shapes(normal)
    assert n["input_conv.0.weight"] == (1536, 1536, 3, 3)
    assert [n[f"upsample_blocks.{i}.0.weight"][0] for i in range(4)] == [4 * 768, 4 * 512, 4 * 256, 4 * 128]
    assert [n[f"conv_layers.{i}.weight"][0] for i in (0, 3, 6)] == [64, 32, 16]
    assert n["conv_normal.weight"] == (3, 16, 1, 1)
    p = shapes(pointmap)
    assert [p[f"upsample_blocks.{i}.0.weight"][0] for i in range(4)] == [4 * 1536, 4 * 768, 4 * 512, 4 * 256]
    assert p["conv_pointmap.weight"] == (3, 16, 1, 1)
    assert [p[f"scale_conv_layers.{i}.weight"] for i in (0, 3, 6)] == [
        (1536, 1536, 1, 1), (512, 1536, 1, 1), (128, 512, 1, 1),
    ]  # fmt: skip
    mlp = [p[f"scale_final_layer.{i}.weight"] for i in (1, 3, 5)]
    assert mlp == [(512, 6144), (128, 512), (1, 128)]


def test_head_outputs_and_strides():
    x = torch.randn(2, 32, 4, 3)
    assert PoseHeatmapHead(32, 17, (16, 16), (8, 8, 8))(x).shape == (2, 17, 16, 12)
    assert NormalHead(32, 3, (8, 8, 8, 8), (8, 8, 8))(x).shape == (2, 3, 64, 48)
    out = PointmapHead(32, 3, (64, 48), (8, 8, 8, 8), (8, 8, 8), (16, 8, 8), (2, 1, 1))(x)
    assert out.points.shape == (2, 3, 64, 48) and out.scale.shape == (2, 1)
    with pytest.raises(ValueError, match="scale_strides"):
        PointmapHead(32, 3, (64, 48), (8, 8, 8, 8), (8, 8, 8), (16, 8, 8), (2, 2, 2))


def test_identify_head_from_shapes():
    assert identify_head(PoseHeatmapHead(32, 308, (16, 12), (8, 8, 4)).state_dict(), "sapiens2") == {
        "task": "pose",
        "layout": "sapiens2",
        "outputs": 308,
        "deconv_channels": [16, 12],
        "conv_channels": [8, 8, 4],
    }
    normal = identify_head(NormalHead(32, 3, (12, 8, 8, 4), (4, 4, 2)).state_dict(), "sapiens2")
    assert normal["task"] == "normal" and normal["upsample_channels"] == [12, 8, 8, 4]
    seg = identify_head(DenseHead(32, 29, (16, 8, 8, 4), (4, 4)).state_dict(), "sapiens2")
    assert seg["task"] == "seg" and seg["outputs"] == 29 and seg["deconv_channels"] == [16, 8, 8, 4]


def test_dice_loss_matches_a_hand_computation():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0, :3] = 255
    probs = logits.softmax(1)
    expected = []
    for b in range(2):
        valid = labels[b] != 255
        for c in (1, 2):  # background excluded
            p, y = probs[b, c][valid], (labels[b][valid] == c).float()
            expected.append(1 - (2 * (p * y).sum() + 1) / ((p**2).sum() + (y**2).sum() + 1))
    assert torch.isclose(DiceLoss()(logits, labels), torch.stack(expected).mean(), atol=1e-6)
    perfect = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert DiceLoss()(perfect, labels) < 0.05


def test_seg_loss_shares_one_softmax_and_equals_the_two_terms_apart():
    """SegmentationTask.loss (one resize, one log-softmax for CE and Dice) == the two modules run apart:
    the same value and the same gradient, ignored pixels included."""
    task = SegmentationTask(32, (64, 48), "goliath_parts28", "goliath", dice_weight=0.5)
    logits = torch.randn(2, 28, 8, 6, requires_grad=True)
    labels = torch.randint(0, 28, (2, 16, 12))
    labels[1, :4] = 255
    shared = task.loss(logits, {"seg": labels})
    (grad_shared,) = torch.autograd.grad(shared, logits)
    apart = task.loss_fn(logits, labels) + task.dice(logits, labels)
    (grad_apart,) = torch.autograd.grad(apart, logits)
    assert torch.allclose(shared, apart, rtol=1e-6)
    assert torch.allclose(grad_shared, grad_apart, rtol=1e-5, atol=1e-9)
    assert grad_shared.abs().sum() > 0


def test_normal_gradient_loss_is_mse_of_finite_differences():
    target = torch.randn(1, 3, 4, 5)
    pred = target.clone()
    mask = torch.ones(1, 4, 5, dtype=torch.bool)
    assert NormalGradientLoss()(pred, target, mask) == 0
    pred[0, 0, 1, 2] += 1.0  # changes 2 horizontal and 2 vertical differences by +-1
    assert torch.isclose(NormalGradientLoss()(pred, target, mask), torch.tensor(4.0 / (3 * (4 * 4 + 3 * 5))))
    assert NormalGradientLoss()(pred, target, torch.zeros_like(mask)) == 0


def test_sapiens2_class_list_and_weights():
    classes = load_class_list("sapiens2_parts29")
    assert classes.num_classes == 29 == len(SAPIENS2_CLASS_WEIGHTS)
    assert classes.names[2] == "Eyeglass" and SAPIENS2_CLASS_WEIGHTS[2] == 10
    assert classes.flip_index[5] == 14 and classes.flip_index[21] == 12


def test_linear_schedule_warms_up_then_decays_to_zero():
    s = ScheduleConfig(kind="linear", warmup_steps=500, warmup_start_factor=1e-3)
    assert s.factor(0, 10_500) == pytest.approx(1e-3)
    assert s.factor(500, 10_500) == pytest.approx(1.0)
    assert s.factor(5_500, 10_500) == pytest.approx(0.5)
    assert s.factor(10_500, 10_500) == 0.0


def _fit(task: torch.nn.Module, features: torch.Tensor, batch: dict, steps: int = 20) -> list[float]:
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = task.loss(task(features), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_each_sapiens2_task_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    features = torch.randn(2, 32, 4, 3)
    pose_head = partial(PoseHeatmapHead, deconv_channels=(16, 16), conv_channels=(8, 8, 8))
    pose = PoseTask(32, (64, 48), "coco17", loss_weight=10.0, head=pose_head)
    heat = torch.zeros(2, 17, 16, 12)
    heat[:, :, 5, 6] = 1.0
    pose_batch = {"heatmaps": F.avg_pool2d(heat, 3, 1, 1) * 9, "target_weight": torch.ones(2, 17)}
    seg_head = partial(DenseHead, deconv_channels=(16, 8, 8, 8), conv_channels=(8, 8), dropout=0.0)
    seg = SegmentationTask(32, (64, 48), "sapiens2_parts29", "sapiens2", dice_weight=1.0, head=seg_head)
    blocks = torch.randint(0, 29, (2, 1, 4, 3)).float()  # one class per patch: learnable from the features
    seg_batch = {"seg": F.interpolate(blocks, size=(64, 48))[:, 0].long()}
    normal_head = partial(NormalHead, upsample_channels=(8, 8, 8, 8), conv_channels=(8, 8, 8))
    normal = NormalTask(32, (64, 48), cosine_weight=10, l1_weight=1, grad_weight=10, head=normal_head)
    n = F.normalize(torch.randn(2, 3, 8, 6), dim=1)
    normal_batch = {
        "normal": F.interpolate(n, size=(64, 48)),
        "mask": torch.ones(2, 64, 48, dtype=torch.bool),
    }
    for task, batch in ((pose, pose_batch), (seg, seg_batch), (normal, normal_batch)):
        losses = _fit(task, features, batch)
        assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), type(task).__name__
    assert pose.loss_fn.loss_weight == 10.0 and seg.dice is not None and normal.grad_loss is not None
