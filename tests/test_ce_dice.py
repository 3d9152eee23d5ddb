"""The fused cross-entropy + Dice loss: the two modules' value and gradient, by its own closed form."""

import pytest
import torch

from sapiens.losses import WeightedCrossEntropy
from sapiens.losses_ce_dice import cross_entropy_dice
from sapiens.losses_sapiens2 import DiceLoss


def case(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 6, 4, generator=g, dtype=dtype).mul(3).requires_grad_()
    labels = torch.randint(0, 5, (2, 6, 4), generator=g)
    labels[0, :2] = 255  # ignored pixels
    weights = torch.rand(5, generator=g, dtype=dtype) + 0.1
    return logits, labels, weights


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_gradient_is_the_derivative_of_the_value(avg_non_ignore: bool):
    """torch.autograd.gradcheck in float64: the written-out backward against finite differences."""
    logits, labels, weights = case(0, torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return cross_entropy_dice(z, labels, weights, 255, avg_non_ignore, 0.7, 1.3, 1.0)

    assert torch.autograd.gradcheck(loss, (logits,))


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_value_and_gradient_equal_the_two_modules_apart(avg_non_ignore: bool):
    logits, labels, weights = case(1, torch.float32)
    ce = WeightedCrossEntropy(weights.tolist(), 255, avg_non_ignore, loss_weight=0.7)
    dice = DiceLoss(255, smooth=1.0, loss_weight=1.3)
    apart = ce(logits, labels) + dice(logits, labels)
    (grad_apart,) = torch.autograd.grad(apart, logits)
    fused = cross_entropy_dice(logits, labels, ce.class_weight, 255, avg_non_ignore, 0.7, 1.3, 1.0)
    (grad_fused,) = torch.autograd.grad(fused, logits)
    assert torch.allclose(fused, apart, rtol=1e-6)
    assert torch.allclose(grad_fused, grad_apart, rtol=1e-4, atol=1e-8)
    assert grad_fused[0, :, :2].abs().max() == 0  # ignored pixels get no gradient


def test_unweighted_and_under_bf16_autocast():
    """No class weights, and called inside bf16 autocast (as in training): still float32 and equal."""
    logits, labels, _ = case(2, torch.float32)
    apart = WeightedCrossEntropy()(logits, labels) + DiceLoss()(logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = cross_entropy_dice(logits, labels)
    assert fused.dtype == torch.float32 and torch.allclose(fused, apart, rtol=1e-6)


def test_shapes_that_do_not_match_are_a_clear_error():
    logits, labels, _ = case(3, torch.float32)
    with pytest.raises(ValueError, match="do not match labels"):
        cross_entropy_dice(logits, labels[:, :3])
