"""Behaviour shared by every LightningModule of the project.

- AdamW over :func:`sapiens.optim.param_groups` (no decay on norms / biases / embeddings, optional layer
  decay), with the lr either given directly or scaled from ``base_lr`` by the effective batch size, and a
  per-step warm-up + cosine / poly / multi-step schedule.
- AdamW is fused (one kernel per step) when every parameter is on CUDA or the CPU.
- A non-finite loss skips that optimizer update on every rank, is counted and logged, and a long run of
  them stops training with :class:`NonFiniteLossError`. The check costs no host-device sync: the flag is
  max-reduced over ranks on the device and handed to fused AdamW as ``found_inf`` (which skips the
  update on the device); the host reads it one step later (:mod:`sapiens.lit.step_flags`) to count,
  log and stop. Callbacks' per-step flags (the Slurm requeue request) ride in the same reduction.
- The gradient norm (before clipping) and the learning rate are logged on logging steps only (logging
  a value makes Lightning copy it to the device, a sync).
- uint8 images (what the sample transforms emit) are normalised on the device right after the
  batch transfer, so data workers and host->device copies move 1 byte per pixel, not 4.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy

from sapiens.data.device_resize import is_packed, resize_crops
from sapiens.data.normalize import normalize_images
from sapiens.lit.step_flags import LaggedStepFlags, ResolvedFlags
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
    fused: bool | None = None  # None: fused AdamW when every parameter is on CUDA or the CPU


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
        self._last_nonfinite_step = -1
        self._skip_update = False  # host-side skip, only without fused AdamW (see guard_loss)
        self._found_inf: torch.Tensor | None = None  # this step's flag on the device (max over micro-batches)
        self._lagged_flags = LaggedStepFlags()
        # Per-step flags that callbacks want max-reduced over ranks: sampled in guard_loss and reduced
        # in the same collective as the non-finite check; the values of step t land in ``step_flags``
        # during step t + 1 (OR-ed until a callback pops them; see callbacks/slurm_requeue.py).
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
        fused = self.use_fused_adamw()
        log.info("AdamW: %s", "fused" if fused else "foreach (not fused: non-finite checks sync every step)")
        opt = torch.optim.AdamW(
            groups, lr=lr, betas=tuple(self.optim_cfg.betas), eps=self.optim_cfg.eps, fused=fused
        )
        sched = build_scheduler(opt, self.schedule_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def use_fused_adamw(self) -> bool:
        """``task.optimizer.fused``, or (None) whether every trainable parameter is a float tensor on
        CUDA or the CPU, where PyTorch has fused AdamW kernels, and no fp16 loss scaler is in play
        (a fused step unscales itself, so gradients could not be clipped before it)."""
        if self.optim_cfg.fused is not None:
            return bool(self.optim_cfg.fused)
        if self._loss_scaler() is not None:
            return False
        params = [p for p in self.parameters() if p.requires_grad]
        supported = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
        return bool(params) and supported

    def _loss_scaler(self):
        """The fp16 ``GradScaler`` of the precision plugin, or None (fp32, bf16, DeepSpeed, no trainer)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as configured. Under bf16-mixed the gradients are unscaled (bf16 needs no loss scaling), so
        they are clipped here directly: Lightning's mixed-precision plugin refuses to clip for any fused
        optimizer, assuming fp16 scaling, which made every bf16 run with fused AdamW stop at step 1."""
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        if gradient_clip_val and mixed and self._loss_scaler() is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ data
    def image_keys(self, batch: dict) -> list[str]:
        """Keys of ``batch`` that hold images to resize / normalise after the transfer (``image``; objectives
        with several views of each image add theirs)."""
        return ["image"]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``batch["image"]`` (and every key of :meth:`image_keys`) uint8 (B, 3, H, W) -> float
        ``(x - mean) / std`` on the device.

        Packed crops (``PretrainTransform(resize_on="device")``) are first resized and flipped
        here, on the device (:func:`sapiens.data.device_resize.resize_crops`).

        The result is float32, or the precision plugin's input dtype (bf16 / fp16 with "*-true"
        precisions and DeepSpeed): Lightning casts float inputs *before* the transfer, when the
        image was still uint8. Float images (already normalised) pass through unchanged.
        """
        if not isinstance(batch, dict):
            return batch
        out = dict(batch)
        for key in self.image_keys(batch):
            image = batch.get(key)
            if is_packed(image):  # crops from PretrainTransform(resize_on="device")
                image = resize_crops(image)
            if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
                image = normalize_images(image)
                if self._trainer is not None:
                    image = self._trainer.precision_plugin.convert_input(image)
                out[key] = image
        return out

    # ------------------------------------------------------------------ non-finite guard
    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss``; when it is non-finite on any rank, this optimizer step changes nothing on
        every rank, the loss is counted, and a long run of them stops training.

        With fused AdamW (the default) nothing here waits for the device: the max-reduced flag is the
        optimizer's ``found_inf`` (the fused kernel then leaves parameters and moments untouched) and
        the host learns about it one step later. Otherwise the flag is read now (one sync per step)
        and a zero loss still connected to every parameter replaces the bad one (so DDP's gradient
        all-reduce still happens); :meth:`optimizer_step` then skips the update.

        The callbacks' ``step_flag_sources`` ride along in the same max-reduce (``step_flags``)."""
        self._stop_if_too_many_nonfinite()
        flags = {"nonfinite": ~torch.isfinite(loss.detach())}
        for name, source in self.step_flag_sources.items():
            flags[name] = loss.new_full((), float(bool(source())))  # a fill kernel, no host->device copy
            self.step_flags.setdefault(name, False)
        world = self.trainer.world_size
        reduced = self._lagged_flags.reduce(flags, world)
        found_inf = reduced[0]
        self._found_inf = found_inf if self._found_inf is None else torch.maximum(self._found_inf, found_inf)
        fused = self._fused_optimizer()
        self._record(self._lagged_flags.push(self.global_step, list(flags), reduced))
        if fused is not None:
            fused.found_inf = self._found_inf
            self._stop_if_too_many_nonfinite()
            return loss
        self._record(self._lagged_flags.resolve())  # no fused optimizer: the host decides now
        self._skip_update = self._skip_update or self._nonfinite_streak > 0
        self._stop_if_too_many_nonfinite()
        if self._nonfinite_streak == 0:
            return loss
        return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)

    def _fused_optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer that will apply this step, when it is fused (takes ``found_inf``)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if len(optimizers) != 1:
            return None
        opt = self.unwrap_optimizer(optimizers[0])
        return opt if isinstance(opt, torch.optim.Optimizer) and opt.defaults.get("fused") else None

    @staticmethod
    def unwrap_optimizer(optimizer):
        """The torch optimizer inside a wrapper (DeepSpeed's ZeRO optimizers keep it as ``.optimizer``)."""
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        return optimizer

    def _record(self, resolved: ResolvedFlags | None) -> None:
        """Count and log a step's host-read flags; hand the callbacks' flags to ``step_flags``."""
        if resolved is None:
            return
        nonfinite = resolved.values.pop("nonfinite")
        for name, value in resolved.values.items():
            self.step_flags[name] = self.step_flags.get(name, False) or value
        if not nonfinite:
            self._nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self._nonfinite_streak += 1
        self._last_nonfinite_step = resolved.step
        log.warning(
            "non-finite loss at step %d: update skipped (%d in a row, %d in total)",
            resolved.step,
            self._nonfinite_streak,
            self.nonfinite_total,
        )

    def _stop_if_too_many_nonfinite(self) -> None:
        if self._nonfinite_streak >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_streak} consecutive non-finite losses (last at step "
                f"{self._last_nonfinite_step}); training stopped. Lower the lr (task.optimizer), check the "
                "data, or use fp32 / bf16-mixed precision instead of fp16."
            )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Fused AdamW skips a non-finite step itself (``found_inf``); otherwise skip it here (DeepSpeed
        manages its own step: zero loss only)."""
        try:
            host_skip = self._fused_optimizer() is None and optimizer_closure is not None
            if not host_skip or isinstance(self.trainer.strategy, DeepSpeedStrategy):
                return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            optimizer_closure()  # forward + backward (+ zero_grad first)
            if self._skip_update:
                optimizer.zero_grad(set_to_none=True)
                return None
            return optimizer.step()  # gradient clipping runs inside, before the step
        finally:
            self._found_inf, self._skip_update = None, False
            fused = self._fused_optimizer()
            if fused is not None and hasattr(fused, "found_inf"):
                del fused.found_inf  # a step whose training_step skipped guard_loss must not reuse it

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """``train/loss`` (also in the progress bar) on logging steps only, as a host tensor: Lightning
        turns progress-bar values into Python numbers after *every* batch until the epoch ends, which
        for a device tensor is a host sync per step. The logger writes step values only on logging
        steps anyway; the one copy here happens on those steps."""
        if self.trainer._logger_connector.should_update_logs:
            value = loss.detach().float().cpu()
            self.log("train/loss", value, on_step=True, prog_bar=True, batch_size=batch_size)

    def flush_step_flags(self) -> None:
        """Read the last step's flags now (a sync): before a checkpoint records the counts, at the end."""
        self._record(self._lagged_flags.resolve())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/skipped_updates", float(self.nonfinite_total), rank_zero_only=True)

    def on_train_end(self) -> None:
        self.flush_step_flags()
        self._stop_if_too_many_nonfinite()

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.trainer._logger_connector.should_update_logs:
            return  # the norm is only worth its kernels (and Lightning's device copy) when logged
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[-1]["lr"], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.flush_step_flags()
        checkpoint["nonfinite_total"] = self.nonfinite_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        log.info("restoring the training state of global step %d", checkpoint.get("global_step", -1))
