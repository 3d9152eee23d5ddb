"""Optimizer groups, layer-wise lr decay, lr scaling and per-step schedules."""

import math

import pytest
import torch
from torch import nn

from sapiens.models.vit import VisionTransformer
from sapiens.optim import (
    ScheduleConfig,
    build_scheduler,
    effective_batch_size,
    param_groups,
    scaled_lr,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = VisionTransformer(
            img_size=(64, 48), embed_dim=64, depth=2, num_heads=4, pos_embed="learned", cls_token=False
        )
        self.head = nn.Conv2d(64, 3, 1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    net = Net()
    groups = param_groups(net, weight_decay=0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            no_decay = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_layer_decay_scales_follow_published_rule():
    net = Net()
    rate = 0.85
    groups = param_groups(net, 0.1, layer_decay=rate, backbone=net.backbone)
    scale = {}
    names = {id(p): n for n, p in net.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
    num_layers = 2 + 2  # depth + 2
    assert scale["backbone.patch_embed.proj.weight"] == pytest.approx(rate ** (num_layers - 1))
    assert scale["backbone.pos_embed"] == pytest.approx(rate**3)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(rate**2)
    assert scale["backbone.blocks.1.mlp.fc1.weight"] == pytest.approx(rate**1)
    assert scale["backbone.norm.weight"] == 1.0 and scale["head.weight"] == 1.0
    assert len({g["lr_scale"] for g in groups}) == num_layers


def test_layer_decay_reaches_each_group_lr():
    net = Net()
    groups = param_groups(net, 0.1, layer_decay=0.5, backbone=net.backbone)
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(kind="constant"), total_steps=10)
    lrs = sorted({round(g["lr"], 6) for g in opt.param_groups})
    assert lrs == [0.125, 0.25, 0.5, 1.0]
    sched.step()


def test_lr_scaling_rule():
    eff = effective_batch_size(per_device=64, devices=8, nodes=8, accumulation=1)
    assert eff == 4096
    assert scaled_lr(1.5e-4, eff) == pytest.approx(2.4e-3)  # the published Sapiens lr


def test_warmup_then_cosine():
    s = ScheduleConfig(kind="cosine", warmup_steps=10, warmup_start_factor=1e-4, min_lr_ratio=0.0)
    assert s.factor(0, 110) == pytest.approx(1e-4)
    assert s.factor(5, 110) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert s.factor(10, 110) == pytest.approx(1.0)
    assert s.factor(60, 110) == pytest.approx(0.5)
    assert s.factor(110, 110) == pytest.approx(0.0, abs=1e-12)
    assert s.factor(35, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_poly_and_multistep():
    poly = ScheduleConfig(kind="poly", warmup_steps=0, power=1.0)
    assert poly.factor(25, 100) == pytest.approx(0.75)
    multi = ScheduleConfig(kind="multistep", milestones=[170, 200], gamma=0.1)
    assert multi.factor(169, 210) == 1.0
    assert multi.factor(170, 210) == pytest.approx(0.1)
    assert multi.factor(205, 210) == pytest.approx(0.01)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule kind"):
        ScheduleConfig(kind="linear-ish")


def test_warmup_as_a_fraction_of_the_run():
    s = ScheduleConfig(kind="cosine", warmup_steps=None, warmup_fraction=0.025, warmup_start_factor=0.0)
    assert s.warmup(1600) == 40
    assert s.factor(20, 1600) == pytest.approx(0.5)
    assert ScheduleConfig(warmup_steps=7, warmup_fraction=0.5).warmup(100) == 7  # explicit steps win
