"""Masked reconstruction plus self-distillation from an EMA teacher (the Sapiens2 pretraining objective, whose
code and settings were not released; built here from MAE, iBOT and DINOv2).

One step, for G global views (B images each) and M local views::

    student (masked, MAE-style)            teacher (EMA, no gradient, every token)
    global views -> embed -> drop masked   global views -> embed -> encode
      tokens -> encode -> latent             cls ----------> cls head -> targets  (centring or Sinkhorn)
        cls -> cls head -----------> L_cls <----'
        MAE decoder (mask tokens)            patches at the student's masked
          -> pixels -> L_mae                 positions -> patch head -> targets
          -> hidden at masked patches
             -> predictor -> patch head -> L_patch <----'
    local views -> encode (unmasked) -> cls -> cls head -> L_cls (against every teacher global view)

    loss = w_mae L_mae + w_cls L_cls + w_patch L_patch + w_koleo L_koleo

Design choice, dense loss: iBOT feeds the student every token with mask tokens in place of the masked
ones, so its encoder output exists at masked positions; MAE drops masked tokens (a 75% mask runs the encoder
on a quarter of the tokens, about 3-4x cheaper). Here the student keeps MAE's token dropping and the dense
prediction at a masked position is read from the MAE decoder's hidden state there (the decoder already
fills masked positions from visible context to reconstruct them), through a linear predictor to the encoder
width and the (shared) prototype head. This is the data2vec 2.0 / I-JEPA arrangement (an encoder on visible
tokens, a light decoder or predictor at masked positions, targets from a teacher that sees the whole image):
the dense loss costs one decoder pass that MAE runs anyway instead of a second, full-length student pass.
The cls loss on a token-dropped view is MSN's (masked siamese networks) and DINO's local-crop idea: the
student must infer the teacher's image-level answer from a part of the image.

Pairs of the cls loss: student view s against teacher view t for every pair of different global views (as
DINO / iBOT: never the same crop) and every local view against every global view; with one global view the
student's masked view is compared with the teacher's unmasked copy of the same view (MSN / Sapiens2's
"masked View1"). The cls loss is the mean over pairs; the patch loss the mean over masked patches (equal
count per image); KoLeo is summed over global views (DINOv2) and computed per rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sapiens.models.distill_heads import DistillHeads
from sapiens.models.distill_health import entropy, kl_to_center
from sapiens.models.distill_losses import TeacherCentering, distill_cross_entropy, koleo_loss
from sapiens.models.ema_teacher import EMATeacher
from sapiens.models.mae import MaskedAutoencoder


@dataclass
class LossWeights:
    """``task.loss_weights``: MAE 1.0 (MAE), cls 1.0 and patch 1.0 (iBOT, DINOv2), KoLeo 0.1 (DINOv2)."""

    mae: float = 1.0
    cls: float = 1.0
    patch: float = 1.0
    koleo: float = 0.1


@dataclass
class HeadConfig:
    """``task.heads``: DINOv2's head (3 layers, hidden 2048, bottleneck 256, 65536 prototypes, one head
    shared by the cls and patch losses)."""

    prototypes: int = 65536
    patch_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    layers: int = 3
    shared: bool = True


@dataclass
class TeacherConfig:
    """``task.teacher``: EMA momentum 0.992 -> 1 by cosine, teacher temperature 0.04 -> 0.07 over the first
    30% of training, then constant, centring with momentum 0.9 (all DINOv2's ``ssl_default_config``, where
    the warm-up is 30 of 100 epochs); Sinkhorn-Knopp with 3 iterations as the alternative."""

    momentum_start: float = 0.992
    momentum_end: float = 1.0
    temp_start: float = 0.04
    temp_end: float = 0.07
    temp_warmup_fraction: float = 0.3
    temp_warmup_steps: int | None = None
    centering: str = "centering"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3


@dataclass
class DistillOutput:
    """One step: ``loss`` (with gradient), ``terms`` (unweighted loss terms) and ``stats`` (teacher health),
    detached scalars; ``pred`` (G*B, L, p*p*3) and ``mask`` (G*B, L) of the global views."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def teacher_modules(mae: MaskedAutoencoder, heads: DistillHeads) -> dict[str, nn.Module]:
    """The student modules the EMA teacher mirrors, by the names its state dict uses (``backbone.*`` as in
    Sapiens2's ``teacher`` checkpoint entry)."""
    return {"backbone": mae.encoder, **heads.teacher_modules()}


class MaskedDistillation(nn.Module):
    """The objective of the module docstring. Holds no trainable parameter: the student (``mae``, ``heads``)
    and the teacher are passed in; its state is the two teacher centres (fp32 buffers).

    Args:
        cls_prototypes, patch_prototypes: K of the cls and patch heads.
        mask_ratio: share of each global view's patches hidden from the student (and reconstructed).
        student_temp: 0.1 (DINO, iBOT, DINOv2).
        teacher: centring rule and momentum (:class:`TeacherConfig`).
        weights: :class:`LossWeights`.
    """

    def __init__(
        self,
        cls_prototypes: int,
        patch_prototypes: int,
        mask_ratio: float = 0.75,
        student_temp: float = 0.1,
        teacher: TeacherConfig | None = None,
        weights: LossWeights | None = None,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio must be in (0, 1): the dense loss needs masked patches, got {mask_ratio}"
            )
        teacher = teacher or TeacherConfig()
        self.mask_ratio, self.student_temp = mask_ratio, student_temp
        self.weights = weights or LossWeights()
        self.cls_centering = TeacherCentering(
            cls_prototypes, teacher.centering, teacher.center_momentum, teacher.sinkhorn_iterations
        )
        self.patch_centering = TeacherCentering(
            patch_prototypes, teacher.centering, teacher.center_momentum, teacher.sinkhorn_iterations
        )

    # ------------------------------------------------------------------ teacher
    @staticmethod
    @torch.no_grad()
    def teacher_logits(
        teacher: EMATeacher, images: torch.Tensor, masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher on every token of (N, 3, H, W): cls logits (N, K) and logits (M, K') of the patches
        where ``masked`` (N, L) is true, fp32.

        Inputs in bf16 / fp16 without an enclosing autocast (DeepSpeed casts the batch, not the ops) run
        under autocast, so the fp32 teacher takes them without a low-precision copy of its weights."""
        low = images.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(
            images.device.type
        )
        with torch.autocast(images.device.type, dtype=images.dtype, enabled=low):
            tokens, grid = teacher.backbone.embed(images)
            tokens = teacher.backbone.encode(tokens, grid)
            p = teacher.backbone.num_prefix_tokens
            return teacher.cls_head(tokens[:, 0]).float(), teacher.patch_head(tokens[:, p:][masked]).float()

    # ------------------------------------------------------------------ step
    def forward(
        self,
        mae: MaskedAutoencoder,
        heads: DistillHeads,
        teacher: EMATeacher,
        global_views: list[torch.Tensor],
        local_views: list[torch.Tensor],
        teacher_temp: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """Loss terms of one batch.

        Args:
            mae: the student encoder + pixel decoder. heads: the student's heads. teacher: the EMA copy.
            global_views: G >= 1 tensors (B, 3, H, W), normalised, same size.
            local_views: M >= 0 tensors (B, 3, h, w), seen unmasked by the student only.
            teacher_temp: the current teacher temperature (cls and patch targets).
            noise: (G*B, L) uniform draws that choose the masks (views stacked view-major), else drawn from
                ``generator``.
        """
        num_global, batch = len(global_views), global_views[0].shape[0]
        images = torch.cat(global_views)  # (G*B, 3, H, W), view-major
        p = mae.encoder.num_prefix_tokens

        # student on the masked global views: MAE reconstruction and the decoder's dense predictions
        latent, mask, ids_restore, grid = mae.forward_encoder(images, self.mask_ratio, generator, noise)
        hidden = mae.decoder.hidden(latent, ids_restore, mae.decoder_pos(grid), p)
        pred = mae.decoder.predict_pixels(hidden, p)
        loss_mae = mae.loss(images, pred, mask)
        masked = mask.bool()
        student_cls = heads.cls_head(latent[:, 0])
        student_patch = heads.patch_head(heads.patch_predictor(hidden[:, p:][masked]))
        student_local = [heads.cls_head(cls) for cls in self._local_cls(mae, local_views)]

        # teacher on the unmasked global views
        with torch.no_grad():
            teacher_cls, teacher_patch = self.teacher_logits(teacher, images, masked)
            cls_targets = self.cls_centering.targets(teacher_cls, teacher_temp)
            patch_targets = self.patch_centering.targets(teacher_patch, teacher_temp)
            stats = {
                "cls_entropy": entropy(cls_targets).mean(),
                "cls_kl_center": kl_to_center(teacher_cls, self.cls_centering.center, teacher_temp).mean(),
                "patch_entropy": entropy(patch_targets).mean(),
                "patch_kl_center": kl_to_center(
                    teacher_patch, self.patch_centering.center, teacher_temp
                ).mean(),
            }
            self.cls_centering.update(teacher_cls)
            self.patch_centering.update(teacher_patch)

        loss_cls = self.cls_loss(student_cls, student_local, cls_targets, num_global, batch)
        loss_patch = distill_cross_entropy(student_patch, patch_targets, self.student_temp).mean()
        terms = {"mae": loss_mae, "cls": loss_cls, "patch": loss_patch}
        w = self.weights
        loss = w.mae * loss_mae + w.cls * loss_cls + w.patch * loss_patch
        if w.koleo and batch > 1:
            terms["koleo"] = sum(koleo_loss(c) for c in latent[:, 0].chunk(num_global))
            loss = loss + w.koleo * terms["koleo"]
        return DistillOutput(
            loss=loss,
            terms={k: v.detach() for k, v in terms.items()},
            stats=stats,
            pred=pred.detach(),
            mask=mask,
        )

    @staticmethod
    def _local_cls(mae: MaskedAutoencoder, local_views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student cls tokens (B, D) of each local view, one encoder pass per view size."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, view in enumerate(local_views):
            by_size.setdefault(tuple(view.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(local_views)
        for indices in by_size.values():
            tokens, grid = mae.encoder.embed(torch.cat([local_views[i] for i in indices]))
            cls = mae.encoder.encode(tokens, grid)[:, 0]
            for i, chunk in zip(indices, cls.chunk(len(indices)), strict=True):
                out[i] = chunk
        return out

    def cls_loss(
        self,
        student_global: torch.Tensor,
        student_local: list[torch.Tensor],
        targets: torch.Tensor,
        num_global: int,
        batch: int,
    ) -> torch.Tensor:
        """Mean cross-entropy over the (student view, teacher view) pairs of the module docstring.

        student_global (G*B, K), student_local M x (B, K), targets (G*B, K) -> scalar."""
        student = student_global.view(num_global, batch, -1)
        teacher = targets.view(num_global, batch, -1)
        pairs = [
            (student[s], teacher[t])
            for s in range(num_global)
            for t in range(num_global)
            if s != t or num_global == 1
        ]
        pairs += [(local, teacher[t]) for local in student_local for t in range(num_global)]
        total = sum(distill_cross_entropy(s, t, self.student_temp).mean() for s, t in pairs)
        return total / len(pairs)
