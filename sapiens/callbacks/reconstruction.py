"""MAE reconstruction pictures (original | masked | reconstruction), saved as PNG and sent to wandb."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from sapiens.visualize import denormalize, save_png, tile, upscale


class ReconstructionLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, reconstruct the first ``num_images`` images of the current
    training batch with a fixed mask seed and write ``<run_dir>/reconstructions/step_XXXXXXX.png``.

    Rows are images; columns are original, masked input, reconstruction (visible patches pasted back).
    """

    def __init__(self, every_n_steps: int = 100, num_images: int = 4, out_dir: str | None = None):
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.out_dir = out_dir

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps != 0 or not hasattr(pl_module, "model"):
            return
        if getattr(self, "_last_step", None) == step:  # gradient accumulation repeats a step
            return
        self._last_step = step
        self.write(trainer, pl_module, batch["image"][: self.num_images], step)

    @torch.no_grad()
    def write(self, trainer, pl_module, images: torch.Tensor, step: int) -> Path:
        """Render and save the picture for ``images`` (B, 3, H, W) normalised; returns its path."""
        was_training = pl_module.training
        pl_module.eval()
        gen = torch.Generator(device=images.device).manual_seed(0)
        _, pred, mask = pl_module.model(images, generator=gen)
        masked, recon = pl_module.model.reconstruct(images, pred, mask)
        pl_module.train(was_training)
        rows = [[upscale(denormalize(x[i])) for x in (images, masked, recon)] for i in range(images.shape[0])]
        picture = tile(rows)
        out = Path(self.out_dir or trainer.default_root_dir) / "reconstructions"
        path = save_png(picture, out / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "train/reconstruction",
                    [np.ascontiguousarray(picture)],
                    step=step,
                    caption=["original | masked | reconstruction"],
                )
        return path
