"""Self-distillation losses over prototype scores (DINO / iBOT / DINOv2), and the teacher's target rules.

The student is trained to match the teacher's distribution over K prototypes with a cross-entropy
``-sum_k p_teacher(k) log softmax(s / student_temp)(k)``. The teacher's distribution must not collapse
(every image onto one prototype, or every image onto the uniform distribution); two published rules
keep it spread:

- ``centering`` (DINO, iBOT, DINOv2 default): ``softmax((t - c) / teacher_temp)`` with the centre ``c``
  an EMA (momentum 0.9) of the batch mean of the teacher logits, over all ranks;
- ``sinkhorn_knopp`` (SwAV, DINOv2 for its largest models): 3 Sinkhorn-Knopp iterations make the batch's
  assignment matrix doubly stochastic (equal mass per prototype), over all ranks.

Teacher temperatures are lower (0.04 -> 0.07) than the student's (0.1): the targets are sharper than
the predictions. KoLeo (DINOv2, weight 0.1) spreads the student's cls features within a batch.

Shapes: N rows (images or patches), K prototypes, D features. Batch statistics (the centre, the
Sinkhorn-Knopp sums) are reduced over all ranks with torch.distributed when a process group exists, so
one process with the global batch and several with its shards compute the same targets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CENTERING_MODES = ("centering", "sinkhorn_knopp")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks in place (no-op without a process group); returns ``x``."""
    if _distributed():
        dist.all_reduce(x)
    return x


def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over all ranks in place (no-op without a process group); returns ``x``."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def distill_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """(N, K) student logits, (N, K) teacher probabilities -> (N,) cross-entropies (nats), in fp32."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * log_p).sum(dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """(N, K) logits -> (N, K) assignment probabilities whose prototype marginals are equal over the batch
    of all ranks (each row sums to 1). ``iterations`` alternate prototype and sample normalisations."""
    logits = teacher_logits.float()
    # exp of logits minus their max over all ranks: a shared constant, so it cancels in the normalisations
    q = torch.exp((logits - max_over_ranks(logits.max().clone())) / teacher_temp).t()
    k = q.shape[0]
    count = sum_over_ranks(torch.tensor(float(q.shape[1]), device=q.device))
    q /= sum_over_ranks(q.sum())
    for _ in range(iterations):
        q /= sum_over_ranks(q.sum(dim=1, keepdim=True))  # every prototype gets 1 / K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # every sample 1 / N
        q /= count
    return (q * count).t()


class TeacherCentering(nn.Module):
    """Teacher targets over K prototypes with either rule of the module docstring, and the centre ``c``.

    The centre is kept (and updated) with both rules: with ``sinkhorn_knopp`` it only serves the health
    signals (:mod:`sapiens.models.distill_health`).

    Args:
        prototypes: K.
        mode: ``centering`` or ``sinkhorn_knopp``.
        momentum: centre EMA momentum (0.9).
        sinkhorn_iterations: 3.
    """

    def __init__(
        self, prototypes: int, mode: str = "centering", momentum: float = 0.9, sinkhorn_iterations: int = 3
    ):
        super().__init__()
        if mode not in CENTERING_MODES:
            raise ValueError(f"teacher centring must be one of {CENTERING_MODES}, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"centre momentum must be in [0, 1), got {momentum}")
        self.mode, self.momentum, self.sinkhorn_iterations = mode, momentum, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, prototypes))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(N, K) teacher logits -> (N, K) fp32 target probabilities (the centre is not updated here)."""
        if self.mode == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher_logits)``, the mean over the rows of every rank."""
        rows = teacher_logits.detach().float()
        total = sum_over_ranks(rows.sum(dim=0, keepdim=True))
        count = sum_over_ranks(torch.tensor(float(rows.shape[0]), device=rows.device))
        self.center.mul_(self.momentum).add_(total / count.clamp(min=1.0), alpha=1.0 - self.momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (DINOv2): ``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised
    (N, D) features, N >= 2; pushes each feature away from its nearest neighbour in the batch."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = sims.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()
