"""MAE pretraining LightningModule: wiring only, the maths lives in :mod:`sapiens.models.mae`."""

from __future__ import annotations

import torch
from torch import nn

from sapiens.lit.base import SapiensModule
from sapiens.models.factory import build_backbone
from sapiens.models.mae import MaskedAutoencoder


class MAEPretrainModule(SapiensModule):
    """Pretrain a backbone of any family (Sapiens ViT, Sapiens2) with masked autoencoding.

    Args:
        backbone: ``model.backbone``: family and shape, built for the ``pretrain`` role by
            :func:`sapiens.models.factory.build_backbone` (for the ViT: sin-cos table and cls token).
        image_size: (H, W) of the training crops, divisible by the patch size.
        mask_ratio: share of patches masked per sample.
        decoder: dict with ``dim``, ``depth``, ``heads`` of the MAE decoder.
        norm_pix_loss: per-patch normalised pixel targets.
        grad_checkpointing: activation checkpointing in every encoder block.
        optimizer, schedule, batch_size, max_consecutive_nonfinite: see :class:`SapiensModule`.
        seed: masks are drawn from a generator seeded by (seed, step, rank), so a resumed run draws
            exactly the masks the uninterrupted run would have drawn.
    """

    def __init__(
        self,
        backbone: dict,
        image_size: tuple[int, int] = (1024, 1024),
        mask_ratio: float = 0.75,
        decoder: dict | None = None,
        norm_pix_loss: bool = True,
        grad_checkpointing: bool = False,
        optimizer: dict | None = None,
        schedule: dict | None = None,
        batch_size: int = 1,
        max_consecutive_nonfinite: int = 20,
        seed: int = 0,
    ):
        super().__init__(optimizer, schedule, batch_size, max_consecutive_nonfinite)
        self.save_hyperparameters()
        decoder = {"dim": 512, "depth": 8, "heads": 16, **(decoder or {})}
        encoder = build_backbone(
            backbone, "pretrain", img_size=tuple(image_size), grad_checkpointing=grad_checkpointing
        )
        self.seed = seed
        self.model = MaskedAutoencoder(
            encoder,
            decoder["dim"],
            decoder["depth"],
            decoder["heads"],
            mask_ratio=mask_ratio,
            norm_pix_loss=norm_pix_loss,
        )

    @property
    def backbone(self) -> nn.Module:
        """The encoder being pretrained."""
        return self.model.encoder

    def param_group_args(self) -> dict:
        return {"no_weight_decay": {f"model.{n}" for n in self.model.no_weight_decay()}}

    def tokens_per_image(self, image: torch.Tensor) -> int:
        """Patch tokens per input image (before masking), for throughput figures."""
        p = self.model.patch_size
        return (image.shape[-2] // p) * (image.shape[-1] // p)

    def mask_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """Generator for this batch's masks, seeded by (seed, global step, batch index, rank): batches
        accumulated into one step still get different masks."""
        key = ((self.seed * 1_000_003 + self.global_step) * 8191 + batch_idx) * 4099 + self.global_rank
        return torch.Generator(device=device).manual_seed(key % (2**63))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """batch["image"]: (B, 3, H, W) normalised float."""
        loss, _, _ = self.model(
            batch["image"], generator=self.mask_generator(batch["image"].device, batch_idx)
        )
        self.log_train_loss(loss, batch_size=batch["image"].shape[0])
        return self.guard_loss(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # A fixed generator per batch makes the validation loss comparable between evaluations.
        gen = torch.Generator(device=batch["image"].device).manual_seed(batch_idx)
        loss, _, _ = self.model(batch["image"], generator=gen)
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0]
        )
