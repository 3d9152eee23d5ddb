"""What every backbone family shares: layer ids for layer-wise lr decay, per-block activation checkpointing
and stochastic depth.

The whole backbone API is described in :mod:`sapiens.models.factory`; families subclass :class:`Backbone` and
name their embedding parameters in ``embedding_names`` (layer 0).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Backbone(nn.Module):
    """Base class of the backbone families (the subclass sets ``depth`` and ``grad_checkpointing``)."""

    family: str = ""  # the name in sapiens.models.factory.FAMILIES (and sapiens.checkpoints.LAYOUTS)
    # Parameter-name prefixes of layer 0 (tokens, embeddings).
    embedding_names: tuple[str, ...] = ()
    depth: int
    grad_checkpointing: bool = False

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 = embeddings, i+1 = block i, depth+1 = final norm.

        With L = depth + 2 groups, the lr scale is ``decay ** (L - 1 - layer_id)``.
        """
        if name.startswith(self.embedding_names):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in the backward pass (activation checkpointing)."""
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """``block(x, *args)``, recomputed in the backward pass when checkpointing is on and grads flow."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch (B, ...) per sample with probability ``rate`` in training,
    scaling the kept ones by 1 / (1 - rate)."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    return x * x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep) / keep
