"""The self-distillation objective (``task=pretrain_distill``) as a benchmark model, and its analytic FLOPs.

A timed step = the student forward on G masked global views (+ M local views), the teacher forward on the
G unmasked views (no backward), losses, backward, ``AdamW.step`` and the teacher's EMA update.

FLOPs, with ``mae_forward_macs`` and ``block_macs`` of ``flops.py`` (per image):

    student forward  = G x MAE forward (encoder on kept tokens, decoder on all)
                     + M x (patch embed + depth x block(l + 1, D)) on the l-token local views
                     + heads: (G + M) cls tokens and G x (L - K) masked patches through the prototype head,
                       the masked patches through the predictor (Dd D) first
    teacher forward  = G x (patch embed + depth x block(L + 1, D)) + G cls tokens and G x (L - K) masked
                       patches through the head
    step FLOPs       = 3 x 2 x student forward + 2 x teacher forward   (the teacher has no backward)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from sapiens.models.distill_heads import DistillHeads
from sapiens.models.ema_teacher import EMATeacher
from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.masked_distill import LossWeights, MaskedDistillation, teacher_modules


def head_macs(in_dim: int, prototypes: int, hidden: int, bottleneck: int, layers: int) -> int:
    """Multiply-adds of one token through a prototype head."""
    widths = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True)) + bottleneck * prototypes


def encoder_macs(shape: dict, tokens: int, block_macs) -> int:
    """Patch embed + every block on ``tokens`` patch tokens + the cls token, one image."""
    p, d, r = shape.get("patch_size", 16), shape["embed_dim"], shape.get("mlp_ratio", 4.0)
    return tokens * 3 * p * p * d + shape["depth"] * block_macs(tokens + 1, d, r)


def distill_step_flops(args: argparse.Namespace, shape: dict, mae_forward_macs, block_macs) -> float:
    """Analytic FLOPs of one step over the batch (formula in the module docstring)."""
    p, d = shape.get("patch_size", 16), shape["embed_dim"]
    length = (args.height // p) * (args.width // p)
    masked = length - max(1, int(length * (1 - args.mask_ratio)))
    local = (args.local_size // p) ** 2
    g, m = args.global_crops, args.local_crops
    decoder = (args.decoder_dim, args.decoder_depth, args.decoder_heads)
    head = head_macs(d, args.prototypes, args.head_hidden, args.head_bottleneck, 3)
    student = g * mae_forward_macs(shape, args.height, args.width, args.mask_ratio, decoder)
    student += m * encoder_macs(shape, local, block_macs)
    student += (g + m) * head + g * masked * (args.decoder_dim * d + head)
    teacher = g * encoder_macs(shape, length, block_macs) + g * (1 + masked) * head
    return float(args.batch * (3 * 2 * student + 2 * teacher))


class DistillBench(nn.Module):
    """Student (MAE + heads) as trainable children; the teacher and the objective held aside, as in
    ``sapiens.lit.pretrain_distill``."""

    def __init__(self, encoder: nn.Module, args: argparse.Namespace):
        super().__init__()
        self.mae = MaskedAutoencoder(
            encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads, mask_ratio=args.mask_ratio
        )
        self.heads = DistillHeads(
            encoder.embed_dim,
            args.decoder_dim,
            args.prototypes,
            args.prototypes,
            args.head_hidden,
            args.head_bottleneck,
        )
        object.__setattr__(self, "teacher", EMATeacher(teacher_modules(self.mae, self.heads)))
        object.__setattr__(
            self,
            "objective",
            MaskedDistillation(args.prototypes, args.prototypes, args.mask_ratio, 0.1, None, LossWeights()),
        )

    def to(self, *args, **kwargs):  # the teacher and centres move with the student (not children)
        self.teacher.to(*args, **kwargs)
        self.objective.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def forward(self, global_views: list[torch.Tensor], local_views: list[torch.Tensor]) -> torch.Tensor:
        """The step's total loss."""
        return self.objective(self.mae, self.heads, self.teacher, global_views, local_views, 0.07).loss

    def update_teacher(self) -> None:
        """The EMA update after the optimizer step (momentum 0.996, mid-schedule)."""
        self.teacher.update(teacher_modules(self.mae, self.heads), 0.996)


def distill_inputs(args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fixed random global (B, 3, H, W) and local (B, 3, l, l) views."""
    globals_ = [
        torch.randn(args.batch, 3, args.height, args.width, device=args.device)
        for _ in range(args.global_crops)
    ]
    locals_ = [
        torch.randn(args.batch, 3, args.local_size, args.local_size, device=args.device)
        for _ in range(args.local_crops)
    ]
    return globals_, locals_


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--task distill`` options of ``pretrain_throughput`` (views and heads; defaults DINOv2's)."""
    parser.add_argument("--global-crops", type=int, default=2, help="distill: global views per image")
    parser.add_argument("--local-crops", type=int, default=0, help="distill: local views per image")
    parser.add_argument("--local-size", type=int, default=96, help="distill: local view side (pixels)")
    parser.add_argument("--prototypes", type=int, default=65536, help="distill: prototypes K (DINOv2)")
    parser.add_argument("--head-hidden", type=int, default=2048, help="distill: head MLP width")
    parser.add_argument("--head-bottleneck", type=int, default=256, help="distill: head bottleneck")


def describe_distill(args: argparse.Namespace) -> str:
    """One summary line of the views and heads."""
    return (
        f"views: {args.global_crops} global + {args.local_crops} local ({args.local_size} px)  heads: "
        f"{args.prototypes} prototypes, hidden {args.head_hidden}, bottleneck {args.head_bottleneck}"
    )
