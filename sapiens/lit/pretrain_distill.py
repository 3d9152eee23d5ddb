"""Masked reconstruction + self-distillation pretraining (``task=pretrain_distill``): wiring only, the maths
is in :mod:`sapiens.models.masked_distill`.

What this module adds to MAE pretraining (:class:`~sapiens.lit.pretrain.MAEPretrainModule`, whose student
encoder, decoder, masks, validation loss and reconstruction pictures it keeps):

- the student heads (``heads``, trained) and the EMA teacher and teacher centres (``teacher``,
  ``objective``: fp32, frozen, deliberately *not* registered as child modules, so that DDP does not track
  them and DeepSpeed neither casts them to bf16 nor shards them; see :mod:`sapiens.models.ema_teacher`);
- the schedules, pure functions of the optimizer step: EMA momentum (cosine), teacher temperature (linear
  warm-up), frozen prototypes for the first steps;
- the teacher's EMA update after every optimizer step (skipped with the update after a non-finite loss);
- checkpoints: Lightning's ``state_dict`` holds the student (``model.encoder.*`` as MAE's) and heads; the
  checkpoint's ``teacher`` entry holds the teacher (``backbone.*``, ``cls_head.*``, ``patch_head.*``, the
  layout of Sapiens2's ``teacher`` entry) and ``distill`` the centres, collapse-detector state and the
  schedule values, so a run resumes exactly;
- health signals in the logs: every loss term, teacher entropy and KL(teacher || centre), momentum,
  teacher temperature, and a warning when the teacher collapses.
"""

from __future__ import annotations

import logging

import torch

from sapiens.data.multicrop_transform import views_in_batch
from sapiens.lit.pretrain import MAEPretrainModule
from sapiens.models.distill_heads import DistillHeads
from sapiens.models.distill_health import CollapseConfig, CollapseDetector
from sapiens.models.distill_losses import CENTERING_MODES
from sapiens.models.ema_teacher import EMATeacher, cosine_schedule, linear_warmup
from sapiens.models.masked_distill import (
    HeadConfig,
    LossWeights,
    MaskedDistillation,
    TeacherConfig,
    teacher_modules,
)

log = logging.getLogger(__name__)


def _config(cls, section: str, values: dict | None):
    """``cls(**values)`` with a one-line error naming the task key of an unknown setting."""
    values = dict(values or {})
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config key 'task.{section}.{unknown[0]}': unknown; expected one of {sorted(known)}"
        )
    return cls(**values)


class DistillPretrainModule(MAEPretrainModule):
    """Pretrain a backbone of any family with masked reconstruction and self-distillation.

    Args:
        backbone, image_size, mask_ratio, decoder, norm_pix_loss, grad_checkpointing, optimizer, schedule,
            batch_size, max_consecutive_nonfinite, seed: as :class:`~sapiens.lit.pretrain.MAEPretrainModule`
            (``mask_ratio`` hides patches of every global view from the student).
        heads: :class:`~sapiens.models.masked_distill.HeadConfig` values.
        teacher: :class:`~sapiens.models.masked_distill.TeacherConfig` values (momentum and temperature
            schedules, centring rule).
        loss_weights: :class:`~sapiens.models.masked_distill.LossWeights` values.
        student_temp: student softmax temperature (0.1).
        freeze_prototypes_fraction: share of training during which the prototypes get no gradient (DINOv2:
            1 of 100 epochs); ``freeze_prototypes_steps`` overrides it when set.
        collapse: :class:`~sapiens.models.distill_health.CollapseConfig` values.
    """

    def __init__(
        self,
        backbone: dict,
        image_size: tuple[int, int] = (1024, 1024),
        mask_ratio: float = 0.75,
        decoder: dict | None = None,
        norm_pix_loss: bool = True,
        grad_checkpointing: bool = False,
        heads: dict | None = None,
        teacher: dict | None = None,
        loss_weights: dict | None = None,
        student_temp: float = 0.1,
        freeze_prototypes_fraction: float = 0.01,
        freeze_prototypes_steps: int | None = None,
        collapse: dict | None = None,
        optimizer: dict | None = None,
        schedule: dict | None = None,
        batch_size: int = 1,
        max_consecutive_nonfinite: int = 20,
        seed: int = 0,
    ):
        super().__init__(
            backbone,
            image_size,
            mask_ratio,
            decoder,
            norm_pix_loss,
            grad_checkpointing,
            optimizer,
            schedule,
            batch_size,
            max_consecutive_nonfinite,
            seed,
        )
        self.save_hyperparameters()
        self.head_cfg = _config(HeadConfig, "heads", heads)
        self.teacher_cfg = _config(TeacherConfig, "teacher", teacher)
        self.collapse_cfg = _config(CollapseConfig, "collapse", collapse)
        weights = _config(LossWeights, "loss_weights", loss_weights)
        if self.teacher_cfg.centering not in CENTERING_MODES:
            raise ValueError(
                f"config key 'task.teacher.centering': expected one of {CENTERING_MODES}, "
                f"got {self.teacher_cfg.centering!r}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"config key 'task.mask_ratio': expected a value in (0, 1) (the patch loss needs masked "
                f"patches), got {mask_ratio}"
            )
        h = self.head_cfg
        self.heads = DistillHeads(
            self.model.encoder.embed_dim,
            self.model.decoder.decoder_embed.out_features,
            h.prototypes,
            h.patch_prototypes,
            h.hidden_dim,
            h.bottleneck_dim,
            h.layers,
            h.shared,
        )
        patch_k = h.prototypes if h.shared else h.patch_prototypes
        objective = MaskedDistillation(
            h.prototypes, patch_k, mask_ratio, student_temp, self.teacher_cfg, weights
        )
        # Not registered as children (module docstring): plain attributes bypass nn.Module.__setattr__.
        object.__setattr__(self, "teacher", EMATeacher(teacher_modules(self.model, self.heads)))
        object.__setattr__(self, "objective", objective)
        self.freeze_prototypes_fraction = freeze_prototypes_fraction
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self._detector: CollapseDetector | None = None
        self._detector_state: dict | None = None

    # ------------------------------------------------------------------ schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run (the schedules' horizon)."""
        return int(self.trainer.estimated_stepping_batches)

    def momentum(self, step: int) -> float:
        """EMA momentum at optimizer step ``step`` (cosine ``momentum_start`` -> ``momentum_end``)."""
        cfg = self.teacher_cfg
        return cosine_schedule(step, self.total_steps, cfg.momentum_start, cfg.momentum_end)

    def teacher_temp(self, step: int) -> float:
        """Teacher temperature at ``step`` (linear warm-up ``temp_start`` -> ``temp_end``, then constant)."""
        cfg = self.teacher_cfg
        warmup = cfg.temp_warmup_steps
        if warmup is None:
            warmup = int(cfg.temp_warmup_fraction * self.total_steps)
        return linear_warmup(step, warmup, cfg.temp_start, cfg.temp_end)

    @property
    def freeze_steps(self) -> int:
        """Optimizer steps at the start during which the prototypes get no gradient."""
        if self.freeze_prototypes_steps is not None:
            return self.freeze_prototypes_steps
        return int(self.freeze_prototypes_fraction * self.total_steps)

    def prototypes_frozen(self, step: int) -> bool:
        """True while the prototypes get no gradient (the first steps of training)."""
        return step < self.freeze_steps

    def schedule_state(self, step: int) -> dict:
        """The schedule values at ``step`` (stored in checkpoints, for the record)."""
        return {
            "step": step,
            "total_steps": self.total_steps,
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "prototypes_frozen": self.prototypes_frozen(step),
        }

    @property
    def detector(self) -> CollapseDetector:
        if self._detector is None:
            self._detector = CollapseDetector(self.collapse_cfg, self.total_steps, self.head_cfg.prototypes)
            if self._detector_state:
                self._detector.load_state_dict(self._detector_state)
        return self._detector

    # ------------------------------------------------------------------ data
    def image_keys(self, batch: dict) -> list[str]:
        global_keys, local_keys = views_in_batch(batch)
        return global_keys + local_keys

    def mask_noise(self, num_views: int, batch: int, length: int, batch_idx: int) -> torch.Tensor:
        """(num_views * B, L) uniform draws that choose the masks of this batch's global views.

        Each (view, sample) row has its own seed from (seed, step, batch index, view, global sample index
        ``j * world + rank``, the order of a distributed sampler), so a batch split over ranks draws the
        masks the whole batch gets in one process, and a resumed run draws the masks of the uninterrupted
        one. Drawn on the CPU (a few KB) and moved once."""
        world, rank = self.trainer.world_size, self.global_rank
        base = ((self.seed * 1_000_003 + self.global_step) * 8191 + batch_idx) * 131
        rows = []
        gen = torch.Generator()
        for view in range(num_views):
            for j in range(batch):
                gen.manual_seed(((base + view) * 1_000_033 + j * world + rank) % (2**63))
                rows.append(torch.rand(length, generator=gen))
        return torch.stack(rows).to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        self.objective.to(self.device)
        log.info(
            "self-distillation: %d steps; EMA momentum %.4g -> %.4g; teacher temperature %.3g -> %.3g; "
            "prototypes frozen for %d steps; teacher: %.1f M fp32 parameters on every device",
            self.total_steps,
            self.teacher_cfg.momentum_start,
            self.teacher_cfg.momentum_end,
            self.teacher_cfg.temp_start,
            self.teacher_cfg.temp_end,
            self.freeze_steps,
            sum(p.numel() for p in self.teacher.parameters()) / 1e6,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """batch: the views of :class:`~sapiens.data.multicrop_transform.MultiCropTransform`, normalised."""
        global_keys, local_keys = views_in_batch(batch)
        views = [batch[k] for k in global_keys]
        b = views[0].shape[0]
        p = self.model.patch_size
        length = (views[0].shape[-2] // p) * (views[0].shape[-1] // p)
        step = self.global_step
        self.heads.set_prototype_grad_scale(0.0 if self.prototypes_frozen(step) else 1.0)
        temp = self.teacher_temp(step)
        out = self.objective(
            self.model,
            self.heads,
            self.teacher,
            views,
            [batch[k] for k in local_keys],
            temp,
            noise=self.mask_noise(len(views), b, length, batch_idx),
        )
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=b)
        for name, value in out.terms.items():
            self.log(f"train/loss_{name}", value, on_step=True, batch_size=b)
        for name, value in out.stats.items():
            self.log(f"distill/{name}", value, on_step=True, batch_size=b)
        self.log("distill/teacher_temp", temp, on_step=True, batch_size=b)
        self.log("distill/momentum", self.momentum(step), on_step=True, batch_size=b)
        if self.trainer._logger_connector.should_update_logs:  # one host sync, on logging steps only
            collapsed = self.detector.check(
                step, float(out.stats["cls_kl_center"]), float(out.stats["cls_entropy"])
            )
            self.log("distill/collapsed", float(collapsed), on_step=True, batch_size=b)
        return self.guard_loss(out.loss)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer step, then the teacher's EMA update with this step's momentum."""
        result = super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not self._skip_update:
            self.teacher.update(teacher_modules(self.model, self.heads), self.momentum(self.global_step))
        return result

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher"] = self.teacher.state_dict()
        checkpoint["distill"] = {
            "centers": self.objective.state_dict(),
            "collapse": self.detector.state_dict() if self._trainer is not None else {},
            "schedules": self.schedule_state(self.global_step) if self._trainer is not None else {},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "teacher" not in checkpoint or "distill" not in checkpoint:
            raise ValueError(
                "the checkpoint to resume from has no 'teacher' entry (an MAE checkpoint?): a "
                "pretrain_distill run resumes only from its own checkpoints; use another run_name or "
                "ckpt_path=null"
            )
        self.teacher.load_state_dict(checkpoint["teacher"])
        self.objective.load_state_dict(checkpoint["distill"]["centers"])
        self._detector_state = checkpoint["distill"].get("collapse") or None
        self._detector = None
