"""Projection heads of masked self-distillation: token features -> scores over K learned prototypes.

:class:`PrototypeHead` is the DINO / iBOT / DINOv2 head: an MLP (GELU, no norm layers), an L2-normalised
bottleneck, and a last layer whose rows (the prototypes) are L2-normalised too, so every logit is a cosine
in [-1, 1] that the loss sharpens with a temperature. Normalising in ``forward`` is the weight-normalised
last layer of those papers with its gain fixed at 1. Defaults: DINOv2 (3 layers, hidden 2048, bottleneck
256, 65536 prototypes).

:class:`PatchPredictor` maps the MAE decoder's hidden states at masked positions (width Dd) to the encoder
width D, so the student's dense predictions and the teacher's patch tokens (width D) enter the same head
architecture, and the teacher's copy of that head is an EMA of the student's. Shapes: N tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PrototypeHead(nn.Module):
    """(N, in_dim) features -> (N, prototypes) cosine logits.

    Args:
        in_dim: feature width (the encoder width D).
        prototypes: K, the number of prototypes (DINOv2 65536; iBOT 8192 for patches).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width of the normalised embedding compared with the prototypes (256).
        layers: MLP layers, the last one into the bottleneck (3).
    """

    def __init__(
        self,
        in_dim: int,
        prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
    ):
        super().__init__()
        if layers < 1 or prototypes < 2:
            raise ValueError(
                f"a prototype head needs >= 1 layer and >= 2 prototypes, got {layers}, {prototypes}"
            )
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            mlp.append(nn.Linear(a, b))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        # 0 during the first steps of training (DINO's "freeze last layer"): the prototypes get a zero
        # gradient, not none, so DDP still sees them used.
        self.prototype_grad_scale = 1.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal (0.02) Linear weights, zero biases, N(0, 1) prototypes (only their direction
        matters)."""
        if self.prototypes.device.type == "meta":
            return
        self.mlp.apply(_init_linear)
        nn.init.normal_(self.prototypes)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> L2-normalised bottleneck embedding (N, bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, K) cosines between the embedding and every prototype."""
        weight = self.prototypes
        if self.prototype_grad_scale != 1.0:
            weight = weight.detach() + (weight - weight.detach()) * self.prototype_grad_scale
        z = self.embed(x)
        return z @ F.normalize(weight, dim=-1).to(z.dtype).t()


class PatchPredictor(nn.Module):
    """(N, decoder_dim) decoder hidden states -> (N, encoder_dim), the width the patch head takes."""

    def __init__(self, decoder_dim: int, encoder_dim: int):
        super().__init__()
        self.proj = nn.Linear(decoder_dim, encoder_dim)
        _init_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Dd) -> (N, D)."""
        return self.proj(x)


class DistillHeads(nn.Module):
    """The student's heads: ``cls_head`` on the encoder's cls token, and ``patch_predictor`` + ``patch_head``
    on the MAE decoder's hidden states at masked patches. With ``shared`` (DINOv2's default) the patch
    head is the cls head itself (one set of prototypes, two centres).

    Args:
        encoder_dim: D. decoder_dim: Dd, the MAE decoder width.
        prototypes: K of the cls head. patch_prototypes: K of a separate patch head (ignored when shared).
        hidden_dim, bottleneck_dim, layers: :class:`PrototypeHead` shape.
        shared: one head for both losses.
    """

    def __init__(
        self,
        encoder_dim: int,
        decoder_dim: int,
        prototypes: int = 65536,
        patch_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        shared: bool = True,
    ):
        super().__init__()
        self.cls_head = PrototypeHead(encoder_dim, prototypes, hidden_dim, bottleneck_dim, layers)
        self.patch_predictor = PatchPredictor(decoder_dim, encoder_dim)
        self.patch_head = (
            self.cls_head
            if shared
            else PrototypeHead(encoder_dim, patch_prototypes, hidden_dim, bottleneck_dim, layers)
        )

    def teacher_modules(self) -> dict[str, nn.Module]:
        """The heads the teacher keeps an EMA copy of (the predictor is student-only: the teacher reads its
        own patch tokens, already of width D)."""
        return {"cls_head": self.cls_head, "patch_head": self.patch_head}

    def set_prototype_grad_scale(self, scale: float) -> None:
        """0 freezes the prototypes of every head (first steps of training), 1 trains them."""
        self.cls_head.prototype_grad_scale = scale
        self.patch_head.prototype_grad_scale = scale
