"""What every fine-tuning task provides to the LightningModule.

A task is an ``nn.Module`` that owns its head, loss and metrics; the LightningModule only wires the
backbone features into it. Shapes: B batch, C backbone width, (h, w) = input size / 16.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class Task(nn.Module):
    """Base class of the four tasks.

    Subclasses set ``head`` in ``__init__`` and implement :meth:`loss`, :meth:`update_metrics`,
    :meth:`compute_metrics`, :meth:`reset_metrics` and :meth:`render`.

    Attributes:
        name: short task name (pose, seg, depth, normal).
    """

    name = "task"
    # The type of the raw output when it is not one tensor (e.g. the pointmap's NamedTuple of points and
    # scale): rebuilt from the tensors of an exported graph, in the same order.
    output_type: type | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w) -> raw head output."""
        return self.head(features)

    def predict(self, net: Callable[[torch.Tensor], torch.Tensor], batch: dict) -> torch.Tensor:
        """Test-time prediction for ``batch["image"]`` with ``net`` = backbone + head (flip tests here)."""
        return net(batch["image"])

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def compute_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def reset_metrics(self) -> None:
        raise NotImplementedError

    def report(self) -> str | None:
        """Markdown detail of the last computed validation (e.g. per-class IoU), or None."""
        return None

    def prepare_validation(self, datamodule) -> None:
        """Hook before a validation epoch (e.g. read ground truth); nothing by default."""

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """A picture (H, W, 3) uint8 of the first ``num`` samples: inputs, ground truth, predictions."""
        raise NotImplementedError
