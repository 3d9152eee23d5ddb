"""Training losses of the published Sapiens recipes (pose, part segmentation, depth, normals).

All losses are plain ``nn.Module`` objects returning a float32 scalar tensor (inputs are cast to
float32, so they are safe under bf16 autocast). Dense losses bilinearly resize
the prediction (``align_corners=False``) to the label size first, as the published heads do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Published Goliath 28-class weights (index = class id; background 0.1).
GOLIATH_CLASS_WEIGHTS: tuple[float, ...] = (
    0.1, 10, 3, 2, 4, 4, 2, 2, 6, 10, 3, 3, 1, 4, 4, 2, 2, 6, 10, 3, 3, 1, 1, 10, 10, 10, 10, 10,
)  # fmt: skip


def resize_to(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, *size) unless it already has that size."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def _check_shape(name: str, tensor: torch.Tensor, ndim: int, expected: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(tensor.shape)}")


def _keypoint_squared_errors(
    loss: str, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, use_weight: bool
) -> torch.Tensor:
    """Mean over (H, W) of ``w * (pred - target)^2`` per sample and keypoint: (B, K) float32.

    pred, target: (B, K, H, W); weight: (B, K) (required when ``use_weight``). Computed in fp32 even under
    bf16 autocast. ``loss`` names the caller in error messages.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"{loss}: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
            "must have the same (B, K, H, W) shape"
        )
    errors = ((pred.float() - target.float()) ** 2).mean(dim=(2, 3))
    if use_weight:
        if weight is None or weight.shape != pred.shape[:2]:
            got = None if weight is None else tuple(weight.shape)
            raise ValueError(f"{loss}: target_weight must be (B, K) = {tuple(pred.shape[:2])}, got {got}")
        errors = errors * weight.to(errors.dtype)
    return errors


class KeypointMSELoss(nn.Module):
    """Heatmap MSE, optionally masked by per-keypoint target weights.

    loss = sum(w_bk * (pred - target)^2) / (B * K * H * W): the masked mean over *all* elements
    (masked-out keypoints still count in the denominator, as in the published recipe).

    Args:
        use_target_weight: multiply per-pixel squared errors by ``target_weight``.
        loss_weight: scalar multiplier.
    """

    def __init__(self, use_target_weight: bool = True, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.use_target_weight = use_target_weight
        self.loss_weight = loss_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pred, target: (B, K, H, W) float; target_weight: (B, K) float (0 = ignore). -> scalar."""
        errors = _keypoint_squared_errors(
            "KeypointMSELoss", pred, target, target_weight, self.use_target_weight
        )
        return errors.mean() * self.loss_weight  # equal H*W per keypoint: the mean over B*K*H*W


class KeypointOHKMMSELoss(nn.Module):
    """Online hard keypoint mining MSE.

    Per sample and keypoint: l_bk = mean_{H,W}(w_bk * (pred - target)^2). Per sample keep the
    ``topk`` largest l_bk and average them; then average over the batch.

    Args:
        topk: keypoints kept per sample (published Goliath 0.3b / 1b: 128); must be <= K.
        use_target_weight: multiply squared errors by ``target_weight``.
        loss_weight: scalar multiplier.
    """

    def __init__(self, topk: int = 8, use_target_weight: bool = True, loss_weight: float = 1.0) -> None:
        super().__init__()
        if topk <= 0:
            raise ValueError(f"KeypointOHKMMSELoss: topk must be positive, got {topk}")
        self.topk = topk
        self.use_target_weight = use_target_weight
        self.loss_weight = loss_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pred, target: (B, K, H, W) float; target_weight: (B, K) float. -> scalar."""
        num_keypoints = pred.shape[1]
        if self.topk > num_keypoints:
            raise ValueError(
                f"KeypointOHKMMSELoss: topk={self.topk} exceeds the number of keypoints {num_keypoints}"
            )
        per_keypoint = _keypoint_squared_errors(
            "KeypointOHKMMSELoss", pred, target, target_weight, self.use_target_weight
        )
        hardest, _ = per_keypoint.topk(self.topk, dim=1)
        return hardest.mean() * self.loss_weight


class WeightedCrossEntropy(nn.Module):
    """Class-weighted per-pixel cross entropy with an ignore label.

    Per pixel: l = class_weight[y] * CE(logits, y), 0 at ignored pixels. The published recipe
    (mmseg ``CrossEntropyLoss(reduction='none')``, then the loss parser's ``.mean()``) averages this
    map over **all** label pixels, ignored ones included, and does not divide by the sum of
    weights; that is the default here (``avg_non_ignore=False``). With ``avg_non_ignore=True`` the
    sum is divided by the number of non-ignored pixels instead.

    Args:
        class_weight: per-class weights (len = number of classes), e.g. GOLIATH_CLASS_WEIGHTS;
            None = unweighted.
        ignore_index: label value excluded from the loss.
        avg_non_ignore: denominator = non-ignored pixel count instead of all pixels.
        loss_weight: scalar multiplier.
    """

    def __init__(
        self,
        class_weight: Sequence[float] | None = None,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        weight = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.loss_weight = loss_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (B, C, h, w) float; labels: (B, H, W) int64 class ids or ignore_index."""
        _check_shape("WeightedCrossEntropy logits", logits, 4, "(B, C, h, w)")
        log_probs = resize_to(logits.float(), tuple(labels.shape[-2:])).log_softmax(dim=1)
        return self.from_log_probs(log_probs, labels)

    def checked_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """labels (B, H, W) as int64, after checking them and the class weights against ``num_classes``
        logit channels: a clear error instead of an index error (or a CUDA device assert) later."""
        if self.class_weight is not None and self.class_weight.numel() != num_classes:
            raise ValueError(
                f"WeightedCrossEntropy: {self.class_weight.numel()} class weights for "
                f"{num_classes} logit channels"
            )
        labels = labels.long()
        out_of_range = (labels != self.ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(out_of_range.any()):  # one sync; CUDA would otherwise fail with a device assert
            raise ValueError(
                f"WeightedCrossEntropy: labels must be in [0, {num_classes}) or "
                f"{self.ignore_index} (ignore); got values {labels.unique().tolist()[:10]}"
            )
        return labels

    def from_log_probs(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same loss from ``log_softmax`` of logits already at the label size: log_probs (B, C, H, W),
        labels (B, H, W). Lets a caller share one softmax between this and a Dice term."""
        _check_shape("WeightedCrossEntropy log-probabilities", log_probs, 4, "(B, C, H, W)")
        _check_shape("WeightedCrossEntropy labels", labels, 3, "(B, H, W)")
        labels = self.checked_labels(labels, log_probs.shape[1])
        weight = None if self.class_weight is None else self.class_weight.to(log_probs.dtype)
        # cross_entropy is exactly log_softmax + nll_loss.
        per_pixel = F.nll_loss(
            log_probs, labels, weight=weight, ignore_index=self.ignore_index, reduction="none"
        )
        if self.avg_non_ignore:
            valid = labels != self.ignore_index
            loss = per_pixel.sum() / valid.sum().clamp(min=1)
        else:
            loss = per_pixel.mean()
        return loss * self.loss_weight


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with 0 (not inf / NaN) gradient at x <= 0, so a perfect prediction stays trainable."""
    positive = x > 0
    return torch.where(positive, x.clamp(min=torch.finfo(x.dtype).tiny).sqrt(), x.new_zeros(()))


def depth_at_target_size(loss: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A one-channel prediction (B, 1, h, w) or (B, h, w), bilinearly resized to ``target``'s (B, H, W), in
    float32; ``loss`` names the caller in a shape error."""
    _check_shape(f"{loss} target", target, 3, "(B, H, W)")
    if pred.ndim == 3:
        pred = pred[:, None]
    _check_shape(f"{loss} pred", pred, 4, "(B, 1, h, w) or (B, h, w)")
    return resize_to(pred.float(), tuple(target.shape[-2:]))[:, 0]


class SiLogLoss(nn.Module):
    """Scale-invariant log loss (published depth loss).

    Per image: valid = (target > eps) & finite(target) [& mask]; d = log(clamp(t, eps)) -
    log(clamp(p, eps)); loss_i = sqrt(mean(d^2) - lambda * mean(d)^2). Returns the mean over images
    with at least one valid pixel (0 with a graph if none). Because the published depth target is
    min-max normalised with background -1, the nearest foreground pixel (exactly 0) is excluded.

    Args:
        lambda_: variance weight (published 0.5).
        eps: validity threshold and log clamp (published 1e-6).
        loss_weight: scalar multiplier.
    """

    def __init__(self, lambda_: float = 0.5, eps: float = 1e-6, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.eps = eps
        self.loss_weight = loss_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pred: (B, 1, h, w) or (B, h, w); target: (B, H, W); mask: (B, H, W) bool or None."""
        pred = depth_at_target_size("SiLogLoss", pred, target)
        target = target.float()
        valid = (target > self.eps) & torch.isfinite(target)
        if mask is not None:
            valid = valid & mask.bool()
        target = torch.where(valid, target, torch.ones_like(target))  # keeps log() finite
        d = torch.log(target.clamp(min=self.eps)) - torch.log(pred.clamp(min=self.eps))
        d = torch.where(valid, d, torch.zeros_like(d))
        count = valid.flatten(1).sum(dim=1)
        has_pixels = count > 0
        if not bool(has_pixels.any()):
            return pred.sum() * 0.0
        n = count.clamp(min=1).to(d.dtype)
        mean_sq = (d**2).flatten(1).sum(dim=1) / n
        mean = d.flatten(1).sum(dim=1) / n
        per_image = _safe_sqrt(mean_sq - self.lambda_ * mean**2)
        return per_image[has_pixels].mean() * self.loss_weight


class NormalLoss(nn.Module):
    """Published normal loss: cosine term + L1 term, both masked means over foreground pixels.

    cosine = mean_valid(1 - <pred/|pred|, target/|target|>); l1 = mean over valid pixels and the 3
    channels of |pred - target| on the *raw* prediction (this pulls pred towards unit length).
    Non-finite per-pixel terms are set to 0. valid = mask (if given) & target finite & target
    > -100 in all channels (published background value is -1000).

    Args:
        cosine_weight, l1_weight: term weights (published 1.0 each).
    """

    def __init__(self, cosine_weight: float = 1.0, l1_weight: float = 1.0) -> None:
        super().__init__()
        self.cosine_weight = cosine_weight
        self.l1_weight = l1_weight

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pred: (B, 3, h, w); target: (B, 3, H, W); mask: (B, H, W) bool or None. -> scalar."""
        _check_shape("NormalLoss pred", pred, 4, "(B, 3, h, w)")
        _check_shape("NormalLoss target", target, 4, "(B, 3, H, W)")
        if pred.shape[1] != 3 or target.shape[1] != 3:
            raise ValueError(
                f"NormalLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} need 3 channels"
            )
        pred = resize_to(pred.float(), tuple(target.shape[-2:]))
        target = target.float()
        valid = (torch.isfinite(target) & (target > -100)).all(dim=1)
        if mask is not None:
            valid = valid & mask.bool()
        target = torch.where(valid[:, None], target, torch.zeros_like(target))
        cosine = F.cosine_similarity(
            F.normalize(pred, dim=1, eps=1e-6), F.normalize(target, dim=1, eps=1e-6), dim=1
        )
        cosine_term = torch.nan_to_num(1.0 - cosine, nan=0.0, posinf=0.0, neginf=0.0)
        l1_term = torch.nan_to_num((pred - target).abs(), nan=0.0, posinf=0.0, neginf=0.0)
        weight = valid.to(pred.dtype)
        count = weight.sum()
        if count == 0:
            return pred.sum() * 0.0
        cosine_loss = (cosine_term * weight).sum() / count
        l1_loss = (l1_term * weight[:, None]).sum() / (3 * count)
        return self.cosine_weight * cosine_loss + self.l1_weight * l1_loss


def normalize_depth_foreground(
    depth: torch.Tensor, mask: torch.Tensor, background: float = -1.0
) -> torch.Tensor:
    """Published depth target: per-image foreground min-max normalisation.

    Args:
        depth: (B, H, W) or (H, W) float camera depth.
        mask: same shape, bool foreground. Non-finite depths are treated as background.
        background: value written outside the foreground (published -1).

    Returns:
        float tensor of the input shape: foreground in [0, 1] (nearest = 0, farthest = 1; a
        constant-depth foreground becomes 0), background = ``background``.
    """
    if depth.shape != mask.shape or depth.ndim not in (2, 3):
        raise ValueError(
            f"normalize_depth_foreground: depth {tuple(depth.shape)} and mask "
            f"{tuple(mask.shape)} must both be (B, H, W) or (H, W)"
        )
    unbatched = depth.ndim == 2
    if unbatched:
        depth, mask = depth[None], mask[None]
    depth = depth.float()
    valid = mask.bool() & torch.isfinite(depth)
    inf = torch.tensor(float("inf"), dtype=depth.dtype, device=depth.device)
    lo = torch.where(valid, depth, inf).flatten(1).amin(dim=1)[:, None, None]
    hi = torch.where(valid, depth, -inf).flatten(1).amax(dim=1)[:, None, None]
    span = (hi - lo).clamp(min=1e-12)
    normalised = torch.where(valid, (depth - lo) / span, torch.full_like(depth, background))
    # A fully-background image has lo=inf; the where() above already wrote background there.
    return normalised[0] if unbatched else normalised
