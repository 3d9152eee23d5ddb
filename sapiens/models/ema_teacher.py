"""The EMA teacher of self-distillation: a frozen fp32 copy of student modules, ``t <- m t + (1 - m) s``.

The copy never receives gradients (``requires_grad=False``, no autograd in its forward passes) and is
updated after each optimizer step with a momentum ``m`` that follows a cosine schedule from ``start``
(DINOv2 0.992, DINO 0.996) to ``end`` (1.0) over training (:func:`cosine_schedule`).

Why a plain fp32 copy outside the strategy's hands: an EMA step adds ``(1 - m) (s - t)``, at most 0.8% of
a weight's distance to the student, which bf16 (8 mantissa bits, steps of 0.4-0.8%) rounds away, so a
teacher that DeepSpeed cast to bf16 would stop following the student. The owner keeps this module out of
its registered children (see ``sapiens.lit.pretrain_distill``), which also keeps it out of DDP's and
DeepSpeed's parameter handling. Cost: 4 bytes per teacher parameter on every GPU, not sharded by ZeRO
(``python -m sapiens.memory_model --objective distill``).

Under ZeRO-3 the student's parameters are partitioned; :meth:`EMATeacher.update` gathers them a chunk at
a time (``deepspeed.zero.GatheredParameters``) to read the full weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from torch import nn

# Parameters gathered at a time under ZeRO-3 (elements): bounds the extra memory of the update.
GATHER_CHUNK_NUMEL = 1 << 26


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``end - (end - start) (1 + cos(pi step / total)) / 2``: ``start`` at step 0, ``end`` at the last
    step and after (DINO's teacher-momentum schedule)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def _gathered(params: list[nn.Parameter]):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values (read-only)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMATeacher(nn.Module):
    """Frozen fp32 copies of named student modules.

    Args:
        students: name -> student module. A module given under two names (a head shared between the cls
            and the patch losses) stays one module in the copy. Its children keep these names, so the
            state dict reads ``backbone.*``, ``cls_head.*``, ...
    """

    def __init__(self, students: dict[str, nn.Module]):
        super().__init__()
        copies = copy.deepcopy(nn.ModuleDict(students))  # one deepcopy keeps shared modules shared
        for name, module in copies.items():
            self.add_module(name, module)
        self.float().requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """Always in eval mode (no stochastic depth, no dropout)."""
        return super().train(False)

    def _pairs(self, students: dict[str, nn.Module]) -> Iterator[tuple[torch.Tensor, nn.Parameter]]:
        """(teacher tensor, student parameter) pairs, each shared parameter once."""
        student_tree = nn.ModuleDict(students)
        mine = list(self.named_parameters())
        theirs = list(student_tree.named_parameters())
        if [n for n, _ in mine] != [n for n, _ in theirs]:
            raise ValueError("the student modules do not match the teacher's (other names or structure)")
        for (_, t), (_, s) in zip(mine, theirs, strict=True):
            yield t, s

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        """``t <- momentum t + (1 - momentum) s`` for every parameter, in fp32 (buffers are not touched).

        ``students`` has the names and structure given at construction.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        chunk: list[tuple[torch.Tensor, nn.Parameter]] = []
        numel = 0
        for pair in self._pairs(students):
            chunk.append(pair)
            numel += pair[0].numel()
            if numel >= GATHER_CHUNK_NUMEL:
                self._lerp(chunk, 1.0 - momentum)
                chunk, numel = [], 0
        if chunk:
            self._lerp(chunk, 1.0 - momentum)

    @staticmethod
    def _lerp(pairs: list[tuple[torch.Tensor, nn.Parameter]], weight: float) -> None:
        teacher = [t for t, _ in pairs]
        with _gathered([s for _, s in pairs]):
            student = [s.detach().to(device=t.device, dtype=t.dtype) for t, s in pairs]
            torch._foreach_lerp_(teacher, student, weight)
