"""Per-step flags decided on the device and read on the host one step later, without a stream sync.

Every training step, each rank computes a few boolean flags (non-finite loss; a Slurm requeue request
from a callback) and max-reduces them over ranks *on the device* (one small all-reduce, which NCCL
enqueues on the stream without a host wait). What must act in the same step (skipping the optimizer
update) reads them on the device (``found_inf`` of fused AdamW). What the host needs (counting,
logging, stopping after too many non-finite losses, the requeue decision) reads them one step later:
the flags are copied into pinned host memory with ``non_blocking=True`` right after they are
reduced, and an event recorded behind the copy is waited on at the next step, when the GPU has long
finished that part of the previous step. So the CPU never waits for the GPU's queue to drain and the
pipeline of kernel launches keeps running ahead.

Every rank reads the same reduced values at the same step, so decisions taken on them (requeue,
stop) happen at the same step boundary on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ResolvedFlags:
    """The host values of one step's flags: ``step`` (the global step they were computed at) and
    ``values`` (name -> bool, max over ranks)."""

    step: int
    values: dict[str, bool]


class LaggedStepFlags:
    """Reduce a step's flags on the device now; hand their host values back at the next step."""

    def __init__(self) -> None:
        self._pending: tuple[int, list[str], torch.Tensor, torch.cuda.Event | None] | None = None

    def reduce(self, flags: dict[str, torch.Tensor], world_size: int) -> torch.Tensor:
        """Max-reduce ``flags`` (name -> 0-dim bool or float tensor on one device) over ranks.

        Returns the reduced (F,) float32 tensor on the device, in the order of ``flags``.
        """
        stacked = torch.stack([v.float().reshape(()) for v in flags.values()])
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            # torch.distributed directly: Lightning's strategy.reduce adds a barrier, a host sync.
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        return stacked

    def push(self, step: int, names: list[str], reduced: torch.Tensor) -> ResolvedFlags | None:
        """Start the host copy of this step's ``reduced`` flags; return the previous step's values."""
        previous = self.resolve()
        if reduced.is_cuda:
            host = torch.empty(reduced.shape, dtype=reduced.dtype, pin_memory=True)
            host.copy_(reduced, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = reduced, None
        self._pending = (step, names, host, event)
        return previous

    def resolve(self) -> ResolvedFlags | None:
        """The host values of the pending step (waiting for its copy if needed), or None."""
        if self._pending is None:
            return None
        step, names, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the copy was queued a step ago: normally long complete
        return ResolvedFlags(step, {n: v > 0 for n, v in zip(names, host.tolist(), strict=True)})
