"""The Lightning Trainer the DDP-equivalence scripts share: ``steps`` optimizer steps on ``devices`` CPU
processes (DDP when more than one), grad clip 1.0, nothing written (no logger, checkpoint or bar)."""

import lightning as L


def few_step_trainer(devices: int, steps: int = 3, **extra) -> L.Trainer:
    """``extra``: further ``L.Trainer`` arguments (e.g. ``use_distributed_sampler=False``)."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        **extra,
    )
