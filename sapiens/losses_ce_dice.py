"""Class-weighted cross-entropy plus softmax Dice over the same pixels, with the gradient written out.

The loss is exactly ``WeightedCrossEntropy`` + ``DiceLoss`` (``sapiens.losses``, ``sapiens.losses_sapiens2``)
on logits already resized to the label size. Autograd through the two terms walks the (B, C, H, W)
probabilities about fifteen times (log-softmax, exp, square, their backward passes and the zero-filled
gradient buffers) and keeps several such tensors alive: on the demo's seg step that was a third of the
step. Here the forward keeps only the probabilities, and the backward is the closed form below, a few
passes. ``tests/test_ce_dice.py`` checks value and gradient against the two modules.

With p = softmax(z) per pixel n, y_n its label, v_n = 1 for non-ignored pixels:
- cross-entropy  L_ce = sum_n v_n w_{y_n} (-log p_{y_n}) / M,  M = all pixels (or the valid ones);
  dL_ce/dz_c = (v_n w_{y_n} / M) (p_c - [c = y_n]);
- Dice, per sample b and class c >= 1: I_c = sum_n v_n p_c [c = y_n], S_c = sum_n v_n p_c^2,
  N_c = sum_n v_n [c = y_n], d_c = 1 - (2 I_c + s) / (S_c + N_c + s), averaged over b and c >= 1
  (k = 1 / their count);
  dL/dI_c = a_c = -2 k / (S_c + N_c + s),  dL/dS_c = b_c = k (2 I_c + s) / (S_c + N_c + s)^2, so
  dL/dp_c = v_n (a_c [c = y_n] + 2 b_c p_c), and through the softmax dz_c = p_c (dp_c - sum_j p_j dp_j).
"""

from __future__ import annotations

import torch


class _CrossEntropyDice(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, class_weight, ignore_index, avg_non_ignore, ce_weight, dice_weight, smooth
    ):
        batch, classes = logits.shape[:2]
        flat = labels.flatten(1)
        kept = flat != ignore_index  # (B, N)
        valid = kept.to(logits.dtype)
        ids = torch.where(kept, flat, 0).long()  # (B, N)
        log_probs = logits.log_softmax(dim=1).flatten(2)  # (B, C, N)
        true_log_prob = log_probs.gather(1, ids[:, None]).squeeze(1)  # (B, N)
        pixel_weight = valid if class_weight is None else class_weight[ids] * valid
        pixels = valid.sum().clamp(min=1) if avg_non_ignore else torch.tensor(float(flat.numel()))
        ce = -(pixel_weight * true_log_prob).sum() / pixels

        probs = log_probs.exp_()  # in place: the log-probabilities are not needed again
        inter = probs.new_zeros(batch, classes).scatter_add_(1, ids, true_log_prob.exp() * valid)
        count = probs.new_zeros(batch, classes).scatter_add_(1, ids, valid)
        squares = torch.bmm(probs.square(), valid[:, :, None]).squeeze(2)  # (B, C)
        denom = squares + count + smooth
        dice = (1 - (2 * inter + smooth) / denom)[:, 1:].mean()

        ctx.save_for_backward(probs, ids, valid, pixel_weight / pixels, inter, denom)
        ctx.shape, ctx.weights, ctx.smooth = logits.shape, (ce_weight, dice_weight), smooth
        return ce * ce_weight + dice * dice_weight

    @staticmethod
    def backward(ctx, grad):
        probs, ids, valid, ce_scale, inter, denom = ctx.saved_tensors
        ce_weight, dice_weight = ctx.weights
        batch, classes, _ = probs.shape
        k = dice_weight / (batch * (classes - 1))
        a = -2 * k / denom  # dL/dI_c, (B, C)
        b = k * (2 * inter + ctx.smooth) / denom.square()  # dL/dS_c
        a[:, 0], b[:, 0] = 0, 0  # background is not a Dice class
        ce_pixel = ce_weight * ce_scale  # (B, N): the cross-entropy's per-pixel coefficient
        true_prob = probs.gather(1, ids[:, None]).squeeze(1)  # (B, N)
        true_a = a.gather(1, ids)  # (B, N)

        # Dense part: p_c (v_n 2 b_c p_c + ce_n - v_n sum_j p_j dp_j); sum_j p_j dp_j = 2 sum_j b_j p_j^2
        # + a_y p_y.
        dense = probs * (2 * b)[:, :, None]  # 2 b_c p_c
        spread = valid * ((dense * probs).sum(1) + true_a * true_prob)  # v_n sum_j p_j dp_j, (B, N)
        dense.mul_(valid[:, None]).add_((ce_pixel - spread)[:, None]).mul_(probs)
        # Sparse part, at c = y_n only: p_y v_n a_y from the Dice intersection, -ce_n from the cross-entropy.
        dense.scatter_add_(1, ids[:, None], (true_prob * valid * true_a - ce_pixel)[:, None])
        return (dense.mul_(grad).view(ctx.shape), *(None,) * 7)


def cross_entropy_dice(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``ce_weight`` x weighted cross-entropy + ``dice_weight`` x softmax Dice (foreground classes): a scalar.

    Args:
        logits: (B, C, H, W) at the label size (resize first); computed in float32 (float64 if given).
        labels: (B, H, W) integer class ids in [0, C) or ``ignore_index`` (not checked here:
            ``WeightedCrossEntropy.checked_labels`` does).
        class_weight: (C,) cross-entropy class weights, or None (uniform).
        avg_non_ignore: divide the cross-entropy by the non-ignored pixels instead of all pixels.
        smooth: the Dice's additive smoothing.
    """
    if logits.shape[-2:] != labels.shape[-2:] or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"cross_entropy_dice: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}"
        )
    if logits.dtype != torch.float64:
        logits = logits.float()
    weight = None if class_weight is None else class_weight.to(logits.dtype)
    with torch.autocast(logits.device.type, enabled=False):  # float32 throughout, the bmm included
        return _CrossEntropyDice.apply(
            logits, labels, weight, ignore_index, avg_non_ignore, ce_weight, dice_weight, smooth
        )
