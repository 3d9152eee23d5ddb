"""Masked reconstruction + self-distillation: the maths on tiny models of both families."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from sapiens.models.distill_heads import DistillHeads, PrototypeHead
from sapiens.models.distill_health import CollapseConfig, CollapseDetector, entropy, kl_to_center
from sapiens.models.distill_losses import TeacherCentering, distill_cross_entropy, koleo_loss, sinkhorn_knopp
from sapiens.models.ema_teacher import EMATeacher, cosine_schedule, linear_warmup
from sapiens.models.factory import build_backbone
from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.masked_distill import LossWeights, MaskedDistillation, TeacherConfig, teacher_modules

VIT = {"family": "vit", "embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": 16}
SAPIENS2 = {
    "family": "sapiens2",
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mhsa_early": 0,
    "mhsa_late": 1,
    "patch_size": 16,
    "num_register_tokens": 2,
    "rope_dtype": "fp32",
}
K = 16


def build(spec: dict, koleo: float = 0.0, centering: str = "centering", shared: bool = True):
    """(student MAE, student heads, EMA teacher, objective) at 64x48."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(build_backbone(spec, "pretrain", (64, 48)), 24, 1, 4, mask_ratio=0.5)
    heads = DistillHeads(32, 24, K, K + 4, hidden_dim=24, bottleneck_dim=8, layers=2, shared=shared)
    teacher = EMATeacher(teacher_modules(mae, heads))
    objective = MaskedDistillation(
        K, K if shared else K + 4, 0.5, 0.1, TeacherConfig(centering=centering), LossWeights(koleo=koleo)
    )
    return mae, heads, teacher, objective


def views(n: int = 2, b: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 64, 48, generator=gen) for _ in range(n)]


def noise_for(n: int, b: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(n * b, 12, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- schedules
def test_schedules_reach_their_ends():
    assert cosine_schedule(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert cosine_schedule(50, 100, 0.992, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(100, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(150, 100, 0.992, 1.0) == pytest.approx(1.0)
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == linear_warmup(99, 30, 0.04, 0.07) == 0.07


# ---------------------------------------------------------------------------------------------- EMA teacher
@pytest.mark.parametrize("shared", [True, False])
def test_ema_update_is_momentum_weighted_average_and_shared_heads_update_once(shared):
    mae, heads, teacher, _ = build(VIT, shared=shared)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in [*mae.encoder.parameters(), *heads.parameters()]:
            p.add_(torch.randn_like(p))
    students = teacher_modules(mae, heads)
    student_state = {
        f"{name}.{k}": v for name, module in students.items() for k, v in module.state_dict().items()
    }
    teacher.update(students, momentum=0.9)
    for key, value in teacher.state_dict().items():
        expected = 0.9 * before[key] + 0.1 * student_state[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    assert (teacher.cls_head is teacher.patch_head) == shared
    teacher.update(students, momentum=1.0)  # momentum 1 keeps the teacher
    torch.testing.assert_close(
        teacher.state_dict()["cls_head.prototypes"],
        0.9 * before["cls_head.prototypes"] + 0.1 * student_state["cls_head.prototypes"],
    )
    teacher.update(students, momentum=0.0)  # momentum 0 copies the student
    torch.testing.assert_close(
        teacher.backbone.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight
    )


def test_ema_teacher_stays_fp32_and_in_eval_mode():
    mae, heads, teacher, _ = build(SAPIENS2)
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="do not match"):
        teacher.update({"backbone": mae.encoder}, 0.9)


@pytest.mark.parametrize("spec", [VIT, SAPIENS2], ids=["vit", "sapiens2"])
def test_teacher_gets_no_gradient_and_every_student_part_does(spec):
    mae, heads, teacher, objective = build(spec, koleo=0.1)
    out = objective(mae, heads, teacher, views(), views(2, 3, 5)[:1], 0.05, noise=noise_for(2, 3))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in [*mae.named_parameters(), *heads.named_parameters()]:
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(out.terms) == {"mae", "cls", "patch", "koleo"}
    assert all(torch.isfinite(v) for v in [*out.terms.values(), *out.stats.values()])


def test_frozen_prototypes_get_a_zero_gradient():
    mae, heads, teacher, objective = build(VIT)
    heads.set_prototype_grad_scale(0.0)
    objective(mae, heads, teacher, views(), [], 0.05, noise=noise_for(2, 3)).loss.backward()
    assert heads.cls_head.prototypes.grad is not None and heads.cls_head.prototypes.grad.abs().max() == 0
    assert heads.cls_head.mlp[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- targets
def test_centring_update_and_targets():
    centering = TeacherCentering(4, momentum=0.9)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5]])
    centering.center.fill_(0.2)
    targets = centering.targets(logits, 0.5)
    torch.testing.assert_close(targets, F.softmax((logits - 0.2) / 0.5, dim=-1))
    centering.update(logits)
    torch.testing.assert_close(centering.center, 0.9 * 0.2 + 0.1 * logits.mean(0, keepdim=True))
    # a per-row constant added to the logits changes nothing (softmax shift invariance)
    torch.testing.assert_close(
        centering.targets(logits + torch.tensor([[3.0], [-1.0]]), 0.5), centering.targets(logits, 0.5)
    )


def test_sinkhorn_knopp_balances_prototypes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=gen) + torch.linspace(0, 2, 8)  # prototype 7 favoured
    q = sinkhorn_knopp(logits, 0.1, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    plain = F.softmax(logits / 0.1, dim=-1).sum(0)
    balanced = q.sum(0)
    assert (balanced.max() - balanced.min()) < 0.75 * (plain.max() - plain.min())  # 3 steps: more even
    converged = sinkhorn_knopp(logits, 0.1, iterations=50)  # doubly stochastic: 64 / 8 per prototype
    torch.testing.assert_close(converged.sum(0), torch.full((8,), 8.0), atol=0.05, rtol=0)
    torch.testing.assert_close(converged.sum(1), torch.ones(64))
    centering = TeacherCentering(8, mode="sinkhorn_knopp")
    torch.testing.assert_close(centering.targets(logits, 0.1), q)
    with pytest.raises(ValueError, match="centring"):
        TeacherCentering(8, mode="softmax")


def test_cross_entropy_is_smallest_when_the_student_matches_the_teacher():
    teacher = F.softmax(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) / 0.1, dim=-1)
    matched = distill_cross_entropy(torch.log(teacher) * 0.1, teacher, 0.1)  # softmax(s / 0.1) == teacher
    torch.testing.assert_close(matched, entropy(teacher))
    assert (distill_cross_entropy(torch.randn(5, 16), teacher, 0.1) > matched).all()


def test_koleo_rewards_spread_features():
    gen = torch.Generator().manual_seed(0)
    spread = torch.eye(6, 8)
    clumped = spread * 0.01 + torch.ones(6, 8)
    assert koleo_loss(spread) < koleo_loss(clumped)
    assert torch.isfinite(koleo_loss(torch.randn(4, 8, generator=gen)))


# ---------------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("spec", [VIT, SAPIENS2], ids=["vit", "sapiens2"])
def test_losses_do_not_depend_on_the_order_of_views_or_samples(spec):
    """Symmetric setting (2 global views, no local ones): swapping which view is first, and permuting the
    batch, give the same loss terms, provided each sample keeps its mask."""
    mae, heads, teacher, objective = build(spec, koleo=0.1)
    with torch.no_grad():  # Sapiens2's 1e-4 layer scales give every image the same cls token at init,
        for name, p in mae.encoder.named_parameters():  # which leaves KoLeo's nearest neighbours tied
            if "gamma" in name:
                p.fill_(0.5)
    a, b = views(2, 4)
    noise = noise_for(2, 4)
    first = copy.deepcopy(objective)(mae, heads, teacher, [a, b], [], 0.05, noise=noise)
    swapped = copy.deepcopy(objective)(
        mae, heads, teacher, [b, a], [], 0.05, noise=torch.cat([noise[4:], noise[:4]])
    )
    perm = torch.tensor([2, 0, 3, 1])
    permuted = copy.deepcopy(objective)(
        mae, heads, teacher, [a[perm], b[perm]], [], 0.05, noise=torch.cat([noise[:4][perm], noise[4:][perm]])
    )
    for name, value in first.terms.items():
        torch.testing.assert_close(swapped.terms[name], value, msg=name)
        torch.testing.assert_close(permuted.terms[name], value, msg=name)


def test_one_global_view_distils_the_masked_view_against_its_unmasked_copy():
    mae, heads, teacher, objective = build(VIT)
    (x,) = views(1, 3)
    out = objective(mae, heads, teacher, [x], [], 0.05, noise=noise_for(1, 3))
    assert torch.isfinite(out.loss) and out.terms["cls"] > 0
    # the same view twice is the symmetric 2-view case: identical cls pairs, so the same cls loss
    same = MaskedDistillation(K, K, 0.5)(
        mae, heads, teacher, [x, x], [], 0.05, noise=noise_for(1, 3).repeat(2, 1)
    )
    torch.testing.assert_close(same.terms["cls"], out.terms["cls"])


# ---------------------------------------------------------------------------------------------- health
def test_collapse_detection_fires_on_a_constant_teacher(caplog):
    """A teacher whose cls head ignores its input (last MLP layer zeroed) answers alike for every image:
    KL(teacher || centre) falls to 0 as the centre catches up, and the detector warns."""
    mae, heads, teacher, objective = build(VIT)
    with torch.no_grad():
        teacher.cls_head.mlp[-1].weight.zero_()
        teacher.cls_head.mlp[-1].bias.normal_()
    detector = CollapseDetector(CollapseConfig(kl_threshold=1e-3, patience=3, start_steps=5), 100, K)
    fired_at = None
    with caplog.at_level(logging.WARNING):
        for step in range(120):
            with torch.no_grad():
                out = objective(
                    mae, heads, teacher, views(2, 3, seed=step), [], 0.05, noise=noise_for(2, 3, step)
                )
            if detector.check(step, float(out.stats["cls_kl_center"]), float(out.stats["cls_entropy"])):
                fired_at = step
                break
    assert fired_at is not None, f"no collapse detected; last KL {float(out.stats['cls_kl_center'])}"
    assert "TEACHER COLLAPSE" in caplog.text and "uniform over the prototypes" in caplog.text
    assert float(out.stats["cls_entropy"]) > 0.9 * math.log(K)  # centred constant output: near uniform


def test_collapse_detection_stays_quiet_on_a_working_teacher():
    mae, heads, teacher, objective = build(VIT)
    detector = CollapseDetector(CollapseConfig(kl_threshold=1e-3, patience=3, start_steps=0), 100, K)
    for step in range(30):
        with torch.no_grad():
            out = objective(
                mae, heads, teacher, views(2, 3, seed=step), [], 0.05, noise=noise_for(2, 3, step)
            )
        assert not detector.check(step, float(out.stats["cls_kl_center"]), float(out.stats["cls_entropy"]))
    assert detector.warnings == 0


def test_kl_to_center_is_zero_only_at_the_centre():
    logits = torch.randn(3, 8)
    torch.testing.assert_close(kl_to_center(logits[:1], logits[:1], 0.1), torch.zeros(1), atol=1e-6, rtol=0)
    assert (kl_to_center(logits, torch.zeros(1, 8), 0.1) > 0).all()


def test_prototype_head_logits_are_cosines():
    head = PrototypeHead(12, prototypes=10, hidden_dim=16, bottleneck_dim=6, layers=3)
    logits = head(torch.randn(7, 12) * 100)
    assert logits.shape == (7, 10) and logits.abs().max() <= 1 + 1e-5


def test_bf16_student_and_inputs_with_an_fp32_teacher():
    """What DeepSpeed bf16 does: the student's weights and the batch in bf16, no autocast; the teacher (not
    handed to DeepSpeed) stays fp32 and runs the bf16 batch under autocast."""
    mae, heads, teacher, objective = build(SAPIENS2)
    mae, heads = mae.to(torch.bfloat16), heads.to(torch.bfloat16)
    bf16_views = [v.to(torch.bfloat16) for v in views()]
    out = objective(mae, heads, teacher, bf16_views, [], 0.05, noise=noise_for(2, 3))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert heads.cls_head.mlp[0].weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mask_ratio": 0.0}, "task.mask_ratio"),
        ({"teacher": {"centering": "sk"}}, "task.teacher.centering"),
        ({"heads": {"protos": 8}}, "task.heads.protos"),
        ({"loss_weights": {"dino": 1.0}}, "task.loss_weights.dino"),
    ],
)
def test_bad_settings_name_their_config_key(kwargs, key):
    from sapiens.lit.pretrain_distill import DistillPretrainModule

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DistillPretrainModule(
            {"embed_dim": 32, "depth": 1, "num_heads": 4, "patch_size": 16}, (64, 48), **kwargs
        )
