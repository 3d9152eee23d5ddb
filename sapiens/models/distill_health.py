"""Health of a self-distillation run: is the teacher still saying something about each image?

A collapsed teacher gives every image the same output: either the uniform distribution over the K
prototypes (entropy log K) or one prototype (entropy 0). Its loss can look fine, so two signals are logged:

- ``entropy``: mean entropy (nats) of the teacher's target distributions; log K = uniform, 0 = one-hot;
- ``kl_center``: mean ``KL(softmax(t_i / T) || softmax(c / T))`` between each teacher output and the centre
  ``c`` (the running mean of teacher outputs): how far single images stand from the average image. It
  goes to 0 in both collapse modes, usually before the loss shows anything (DINO, section 5.3).

:class:`CollapseDetector` turns ``kl_center`` into a warning: below ``kl_threshold`` at ``patience``
consecutive checks, once ``start_step`` is reached (an untrained teacher answers alike for every image).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@torch.no_grad()
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, K) probabilities -> (N,) entropies in nats."""
    p = probs.float()
    return -(p * torch.log(p.clamp(min=1e-30))).sum(dim=-1)


@torch.no_grad()
def kl_to_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """(N, K) teacher logits, (1, K) centre -> (N,) ``KL(softmax(t / T) || softmax(c / T))`` in nats."""
    log_p = F.log_softmax(teacher_logits.float() / teacher_temp, dim=-1)
    log_q = F.log_softmax(center.float() / teacher_temp, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@dataclass
class CollapseConfig:
    """When to call the teacher collapsed (``task.collapse``).

    kl_threshold: ``kl_center`` (nats) under which outputs count as image-independent.
    patience: consecutive checks under the threshold before the warning.
    start_fraction: share of training before which no warning is given (an untrained teacher answers alike
        for every image); ``start_steps`` overrides it when set.
    """

    kl_threshold: float = 1e-3
    patience: int = 3
    start_fraction: float = 0.1
    start_steps: int | None = None


class CollapseDetector:
    """Counts consecutive low-``kl_center`` checks and says when the teacher has collapsed.

    Args:
        config: thresholds (:class:`CollapseConfig`).
        total_steps: optimizer steps of the run (for ``start_fraction``).
        prototypes: K, to put the entropy next to log K in the warning.
    """

    def __init__(self, config: CollapseConfig, total_steps: int, prototypes: int):
        self.config = config
        self.start = (
            config.start_steps if config.start_steps is not None else int(config.start_fraction * total_steps)
        )
        self.log_k = math.log(prototypes)
        self.streak = 0
        self.collapsed = False
        self.warnings = 0

    def check(self, step: int, kl_center: float, entropy_nats: float) -> bool:
        """Feed one measurement; returns True while the teacher counts as collapsed (warns on entry)."""
        if step < self.start or not math.isfinite(kl_center):
            self.streak = 0
            return False
        self.streak = self.streak + 1 if kl_center < self.config.kl_threshold else 0
        was = self.collapsed
        self.collapsed = self.streak >= self.config.patience
        if self.collapsed and not was:
            self.warnings += 1
            kind = (
                "uniform over the prototypes"
                if entropy_nats > 0.9 * self.log_k
                else "one prototype for every image"
                if entropy_nats < 0.1 * self.log_k
                else "the same distribution for every image"
            )
            log.warning(
                "TEACHER COLLAPSE at step %d: KL(teacher || centre) = %.2e nats < %.0e for %d checks; "
                "teacher entropy %.3f nats (uniform = %.3f): %s. Training continues, but the distillation "
                "losses no longer teach anything. Usual remedies: a lower teacher temperature "
                "(task.teacher.temp_end), a higher EMA momentum (task.teacher.momentum_start), a lower lr, "
                "more warm-up, or task.teacher.centering=sinkhorn_knopp.",
                step,
                kl_center,
                self.config.kl_threshold,
                self.streak,
                entropy_nats,
                self.log_k,
                kind,
            )
        elif was and not self.collapsed:
            log.warning("teacher recovered at step %d: KL(teacher || centre) = %.2e nats", step, kl_center)
        return self.collapsed

    def state_dict(self) -> dict:
        return {"streak": self.streak, "collapsed": self.collapsed, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
        self.collapsed = bool(state.get("collapsed", False))
        self.warnings = int(state.get("warnings", 0))
