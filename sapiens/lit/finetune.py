"""Fine-tuning LightningModule: a backbone (Sapiens ViT or Sapiens2) + one task (pose, seg, depth, normal or
pointmap).

Wiring only: the backbone turns images into a (B, C, H/16, W/16) feature map, the task
(:mod:`sapiens.tasks`) owns the head, loss, decoding, metrics and pictures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger

from sapiens.checkpoints import WEIGHT_SOURCES, load_backbone_state, load_head_state
from sapiens.lit.base import SapiensModule
from sapiens.model_spec import spec_of_module
from sapiens.models.factory import build_backbone
from sapiens.tasks.base import Task
from sapiens.visualize import save_png

log = logging.getLogger(__name__)


class FinetuneModule(SapiensModule):
    """Backbone + task head trained end to end with layer-wise lr decay.

    Args:
        backbone: ``model.backbone``: family and shape (embed_dim, depth, num_heads, patch_size, ...);
            see :func:`sapiens.models.factory.build_backbone`.
        task_head: ``fn(in_channels=..., image_size=...) -> Task`` (a Hydra partial of a task class).
        image_size: (H, W) of the inputs (1024 x 768 published).
        patch_padding: patch-embed conv padding (2 for pose and normals, 0 for seg and depth).
        init_from: a pretraining checkpoint: ours (Lightning ``.ckpt``), a published ``sapiens_*_clean.pth``
            or a consolidated ZeRO fp32 file; a fine-tuned checkpoint (published or ours) also initialises the
            head when it fits. None trains from random initialisation.
        init_weights: which encoder of a self-distillation checkpoint (``task=pretrain_distill``) to start
            from: ``teacher`` (its EMA teacher, the default, as Sapiens2) or ``student``.
        drop_path_rate: stochastic depth (0 in every published config).
        grad_checkpointing: activation checkpointing in every block.
        num_pictures: validation samples drawn in the prediction picture (0 = none).
        freeze_backbone: train the head only (a linear-probe-style test of what pretraining learned): the
            backbone gets ``requires_grad=False``, stays in eval mode, runs without autograd and is left
            out of the optimizer; it is still saved in (and restored from) checkpoints.
        optimizer, schedule, batch_size, max_consecutive_nonfinite: see :class:`SapiensModule`.
    """

    def __init__(
        self,
        backbone: dict,
        task_head: Callable[..., Task],
        image_size: tuple[int, int] = (1024, 768),
        patch_padding: int = 0,
        init_from: str | None = None,
        init_weights: str = "teacher",
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        num_pictures: int = 4,
        freeze_backbone: bool = False,
        optimizer: dict | None = None,
        schedule: dict | None = None,
        batch_size: int = 1,
        max_consecutive_nonfinite: int = 20,
    ):
        super().__init__(optimizer, schedule, batch_size, max_consecutive_nonfinite)
        self.save_hyperparameters(ignore=["task_head"])
        self.backbone = build_backbone(
            backbone,
            "finetune",
            img_size=tuple(image_size),
            patch_padding=patch_padding,
            drop_path_rate=drop_path_rate,
            grad_checkpointing=grad_checkpointing,
        )
        self.task = task_head(in_channels=self.backbone.embed_dim, image_size=tuple(image_size))
        self.init_report = None
        if init_weights not in WEIGHT_SOURCES:
            raise ValueError(
                f"config key 'task.init_weights': expected one of {WEIGHT_SOURCES}, got {init_weights!r}"
            )
        if init_from:  # backbone always; the head too when the file is a fine-tuned model of this task
            self.init_report = load_backbone_state(self.backbone, init_from, weights=init_weights)
            self.init_report["head"] = load_head_state(self.task.head, init_from)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            log.info("backbone frozen: only the %s head trains", self.task.name)
        self.num_pictures = num_pictures
        self._picture_batch: tuple[dict, torch.Tensor] | None = None

    def param_group_args(self) -> dict:
        return {"backbone": self.backbone, "backbone_prefix": "backbone."}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # What predict / export / mode=validate rebuild the model from (sapiens.model_spec).
        checkpoint["sapiens_model"] = spec_of_module(self).to_dict()

    def train(self, mode: bool = True) -> FinetuneModule:
        """Lightning switches modes around validation; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> the task head's raw output."""
        if not self.freeze_backbone:
            return self.task(self.backbone(images))
        with torch.no_grad():  # no activations kept for a backward pass that never reaches it
            features = self.backbone(images)
        return self.task(features)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task.loss(self(batch["image"]), batch)
        size = batch["image"].shape[0]
        self.log_train_loss(loss, batch_size=size)
        if self.trainer._logger_connector.should_update_logs:  # logging steps only, as log_train_loss
            for name, value in getattr(self.task, "loss_terms", {}).items():  # tasks with several terms
                self.log(f"train/loss_{name}", value.float(), on_step=True, batch_size=size)
        return self.guard_loss(loss)

    def on_validation_epoch_start(self) -> None:
        self.task.prepare_validation(self.trainer.datamodule)
        self._picture_batch = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self.task.predict(self, batch)
        self.log(
            "val/loss",
            self.task.loss(outputs, batch),
            on_epoch=True,
            sync_dist=True,
            batch_size=batch["image"].shape[0],
        )
        self.task.update_metrics(outputs, batch)
        if batch_idx == 0 and self.num_pictures:
            self._picture_batch = (batch, _detach(outputs))

    def on_validation_epoch_end(self) -> None:
        metrics = self.task.compute_metrics()
        for name, value in metrics.items():
            self.log(
                f"val/{name}", value, prog_bar=name in ("AP", "mIoU", "rmse", "mean_angular_error", "l2")
            )
        report = self.task.report() if metrics else None
        if report and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = Path(self.trainer.default_root_dir) / "val_report.md"
            path.write_text(f"Validation at step {self.global_step}\n\n{report}\n")
        self.task.reset_metrics()
        if (
            self._picture_batch is not None
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
        ):
            self.write_picture(*self._picture_batch)
        self._picture_batch = None

    @torch.no_grad()
    def write_picture(self, batch: dict, outputs: torch.Tensor) -> Path:
        """Save ``<run_dir>/predictions/step_XXXXXXX.png`` (and send it to wandb)."""
        picture = self.task.render(batch, outputs, self.num_pictures)
        step = self.global_step
        path = save_png(picture, Path(self.trainer.default_root_dir) / "predictions" / f"step_{step:07d}.png")
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(f"val/{self.task.name}_predictions", [picture], step=step)
        return path


def _detach(outputs):
    """A head's output (a tensor, or a tuple of tensors such as the pointmap head's) without its graph."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    detached = [o.detach() for o in outputs]
    return type(outputs)(*detached) if hasattr(outputs, "_fields") else type(outputs)(detached)
