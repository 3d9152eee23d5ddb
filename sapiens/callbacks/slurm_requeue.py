"""Slurm preemption: take the requeue signal at a training-step boundary on every rank at once.

Lightning's SLURMEnvironment saves ``hpc_ckpt_N.ckpt`` and requeues from inside the SIGUSR1 handler. With
several ranks, the signal can land while one rank already waits in a collective (a per-step reduce, a
checkpoint barrier) and another starts the checkpoint's barrier instead: both hang until the time limit.
This callback only sets a flag in the handler; after each training batch the ranks agree (max-reduce of
the flag) and all run Lightning's own save-and-requeue at the same step. With our LightningModules the
flag rides in the non-finite-loss check's all-reduce (``step_flag_sources``), so it costs no collective
of its own, and is read one step later without a host sync (``sapiens/lit/step_flags.py``): the ranks
requeue at the end of the step after the one that saw the signal. Other modules get a separate max-reduce.
"""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment


class SlurmRequeueAtStepBoundary(L.Callback):
    """Defer Lightning's Slurm auto-requeue to the end of a training batch (no-op outside Slurm)."""

    def __init__(self):
        self.requested = False
        self._signum: int | None = None
        self._active = False
        self._acted = False

    def _flag(self, signum, frame) -> None:
        self.requested, self._signum = True, signum

    def setup(self, trainer, pl_module, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if stage == "fit" and isinstance(env, SLURMEnvironment) and env.auto_requeue:
            # Registered before Lightning's signal connector runs, which keeps a handler it finds.
            signal.signal(env.requeue_signal, self._flag)
            self._active = True
            if isinstance(getattr(pl_module, "step_flag_sources", None), dict):
                pl_module.step_flag_sources["slurm_requeue"] = lambda: self.requested

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        step_flags = getattr(pl_module, "step_flags", None)
        if isinstance(step_flags, dict) and "slurm_requeue" in step_flags:
            requested = step_flags.pop("slurm_requeue")  # reduced over ranks in guard_loss
            if self._acted:  # sampled during the step that requeued, before `requested` was reset
                requested, self._acted = False, False
        else:
            flag = torch.tensor(float(self.requested), device=pl_module.device)
            if trainer.world_size > 1:
                flag = trainer.strategy.reduce(flag, reduce_op="max")
            requested = flag.item() > 0
        if requested:
            self.requested, self._acted = False, True
            # Lightning's own handler: save the hpc checkpoint on every rank, then `scontrol requeue`.
            trainer._signal_connector._slurm_sigusr_handler_fn(self._signum or signal.SIGUSR1, None)
