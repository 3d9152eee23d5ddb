"""Behaviour shared by every LightningModule of the project.

- AdamW over :func:`sapiens.optim.param_groups` (no decay on norms / biases / embeddings, optional layer
  decay), with the lr either given directly or scaled from ``base_lr`` by the effective batch size, and a
  per-step warm-up + cosine / poly / multi-step schedule.
- A non-finite loss skips that optimizer update on every rank, is counted and logged, and a long run of
  them stops training with :class:`NonFiniteLossError`.
- The gradient norm (before clipping) and the learning rate are logged.
- uint8 images (what the sample transforms emit) are normalised on the device right after the
  batch transfer, so data workers and host->device copies move 1 byte per pixel, not 4.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from sapiens.data.device_resize import is_packed, resize_crops
from sapiens.data.normalize import normalize_images
from sapiens.optim import (
    ScheduleConfig,
    build_scheduler,
    effective_batch_size,
    param_groups,
    scaled_lr,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


@dataclass
class OptimizerConfig:
    """AdamW settings. Exactly one of ``lr`` (absolute) and ``base_lr`` (scaled by batch / 256) is used:
    ``lr`` wins when set."""

    lr: float | None = None
    base_lr: float | None = 1.5e-4
    base_batch_size: int = 256
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    layer_decay: float | None = None


class SapiensModule(L.LightningModule):
    """Base class: optimizer/scheduler construction, non-finite guard, grad-norm and lr logging.

    Subclasses implement ``training_step`` through :meth:`guard_loss` and define ``param_group_args()``.
    """

    def __init__(
        self,
        optimizer: dict | None = None,
        schedule: dict | None = None,
        batch_size: int = 1,
        max_consecutive_nonfinite: int = 20,
    ):
        super().__init__()
        self.optim_cfg = OptimizerConfig(**(optimizer or {}))
        self.schedule_cfg = ScheduleConfig(**(schedule or {}))
        self.batch_size = batch_size
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_total = 0
        self._nonfinite_streak = 0
        self._skip_update = False
        # Per-step flags that callbacks want max-reduced over ranks: sampled in guard_loss and reduced
        # in the same collective as the non-finite check (one all-reduce and one host sync per step);
        # the reduced values land in ``step_flags`` (see callbacks/slurm_requeue.py).
        self.step_flag_sources: dict[str, Callable[[], bool]] = {}
        self.step_flags: dict[str, bool] = {}

    # ------------------------------------------------------------------ optimizer
    def param_group_args(self) -> dict:
        """Keyword arguments for :func:`sapiens.optim.param_groups` besides weight decay."""
        return {}

    def resolve_lr(self) -> tuple[float, int]:
        """The absolute lr and the effective batch it was scaled for."""
        trainer = self.trainer
        eff = effective_batch_size(
            self.batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
        )
        if self.optim_cfg.lr is not None:
            return self.optim_cfg.lr, eff
        if self.optim_cfg.base_lr is None:
            raise ValueError("task.optimizer needs either lr or base_lr")
        return scaled_lr(self.optim_cfg.base_lr, eff, self.optim_cfg.base_batch_size), eff

    def configure_optimizers(self):
        lr, eff = self.resolve_lr()
        groups = param_groups(
            self,
            self.optim_cfg.weight_decay,
            layer_decay=self.optim_cfg.layer_decay,
            **self.param_group_args(),
        )
        total = int(self.trainer.estimated_stepping_batches)
        how = (
            "given"
            if self.optim_cfg.lr is not None
            else (f"= base_lr {self.optim_cfg.base_lr:g} x {eff} / {self.optim_cfg.base_batch_size}")
        )
        log.info(
            "lr %.3g (%s); effective batch %d = %d per device x %d devices x %d nodes x %d "
            "accumulation; %d optimizer steps; %d parameter groups",
            lr,
            how,
            eff,
            self.batch_size,
            self.trainer.num_devices,
            self.trainer.num_nodes,
            self.trainer.accumulate_grad_batches,
            total,
            len(groups),
        )
        for g in groups:
            g["lr"] = lr
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.optim_cfg.betas), eps=self.optim_cfg.eps)
        sched = build_scheduler(opt, self.schedule_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ data
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``batch["image"]`` uint8 (B, 3, H, W) -> float ``(x - mean) / std`` on the device.

        Packed crops (``PretrainTransform(resize_on="device")``) are first resized and flipped
        here, on the device (:func:`sapiens.data.device_resize.resize_crops`).

        The result is float32, or the precision plugin's input dtype (bf16 / fp16 with "*-true"
        precisions and DeepSpeed): Lightning casts float inputs *before* the transfer, when the
        image was still uint8. Float images (already normalised) pass through unchanged.
        """
        image = batch.get("image") if isinstance(batch, dict) else None
        if is_packed(image):  # crops from PretrainTransform(resize_on="device")
            image = resize_crops(image)
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            image = normalize_images(image)
            if self._trainer is not None:
                image = self._trainer.precision_plugin.convert_input(image)
            batch = {**batch, "image": image}
        return batch

    # ------------------------------------------------------------------ non-finite guard
    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss``, or a zero loss still connected to every parameter when it is non-finite
        on any rank (so DDP's gradient all-reduce still happens); the update is then skipped.

        The callbacks' ``step_flag_sources`` ride along in the same max-reduce (``step_flags``)."""
        names = list(self.step_flag_sources)
        local = [~torch.isfinite(loss.detach())]
        local += [torch.tensor(bool(self.step_flag_sources[n]()), device=loss.device) for n in names]
        flags = torch.stack(local).float()
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        bad, *rest = (value > 0 for value in flags.tolist())  # the one host sync of the step
        self.step_flags = dict(zip(names, rest, strict=True))
        self._skip_update = bad
        if not self._skip_update:
            self._nonfinite_streak = 0
            return loss
        self.nonfinite_total += 1
        self._nonfinite_streak += 1
        log.warning(
            "non-finite loss at step %d: update skipped (%d in a row, %d in total)",
            self.global_step,
            self._nonfinite_streak,
            self.nonfinite_total,
        )
        if self._nonfinite_streak >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_streak} consecutive non-finite losses (last at step "
                f"{self.global_step}); training stopped. Lower the lr (task.optimizer), check the "
                "data, or use fp32 / bf16-mixed precision instead of fp16."
            )
        return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Skip the update after a non-finite loss (DeepSpeed manages its own step: zero loss only)."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # forward + backward (+ zero_grad first)
        if self._skip_update:
            optimizer.zero_grad(set_to_none=True)
            return None
        return optimizer.step()  # gradient clipping runs inside, before the step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/skipped_updates", float(self.nonfinite_total), rank_zero_only=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.stack(grads).norm()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[-1]["lr"], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_total"] = self.nonfinite_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        log.info("restoring the training state of global step %d", checkpoint.get("global_step", -1))
