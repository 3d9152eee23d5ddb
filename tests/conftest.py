"""Shared fixtures: tiny generated image shards and a helper that runs train.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from sapiens.data.shard_writer import open_shard_writer

ROOT = Path(__file__).resolve().parents[1]


def _blob_image(rng: np.random.Generator) -> np.ndarray:
    """A small RGB picture with a few coloured shapes, so that MAE has structure to learn."""
    h, w = int(rng.integers(72, 140)), int(rng.integers(56, 110))
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    for _ in range(3):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(6, 24)), colour, -1)
    return img


def write_image_shards(out_dir: Path, num: int, per_shard: int, seed: int = 0) -> Path:
    """Pretraining shards (`jpg` per sample) of generated pictures in ``out_dir``."""
    rng = np.random.default_rng(seed)
    with open_shard_writer(out_dir, max_count=per_shard, progress=False) as sink:
        for i in range(num):
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_blob_image(rng), cv2.COLOR_RGB2BGR))
            assert ok
            sink.write({"__key__": f"img{i:05d}", "jpg": buf.tobytes()})
    return out_dir


@pytest.fixture(scope="session")
def pretrain_data_root(tmp_path_factory) -> Path:
    """A data root laid out like SynthHumans' (``shards/pretrain/{train,val}``) for `data.root=`."""
    root = tmp_path_factory.mktemp("pretrain_data")
    write_image_shards(root / "shards" / "pretrain" / "train", 96, 24, seed=0)
    write_image_shards(root / "shards" / "pretrain" / "val", 32, 16, seed=1)
    return root


def run_train(
    args: list[str], cwd: Path | None = None, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python train.py *args`` from the repo root with offline wandb; returns the process."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    full_env.pop("SLURM_JOB_ID", None)
    full_env.pop("SLURM_NTASKS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


TINY = [
    "experiment=pretrain_demo",
    "model=vit_tiny",
    "task.image_size=[64,48]",
    "task.decoder.dim=32",
    "task.decoder.depth=1",
    "task.decoder.heads=4",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.epoch_length=5",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small SynthHumans root with shards of all five tasks (128x96 images)."""
    from data.synthhumans.shards import build

    root = tmp_path_factory.mktemp("synthhumans")
    return build(root, num_train=48, num_val=12, height=128, width=96, progress=False)


@pytest.fixture(scope="session")
def pretrained_ckpt(synth_root, tmp_path_factory) -> Path:
    """A tiny MAE pretraining checkpoint (vit_tiny, 64x48) made through train.py."""
    out = tmp_path_factory.mktemp("pretrain_runs")
    run_train(
        [
            *TINY,
            f"data.root={synth_root}",
            f"paths.output_dir={out}",
            "run_name=pre",
            "logger=csv",
            "trainer.max_steps=5",
        ]
    )
    return out / "pretrain" / "pre" / "checkpoints" / "last.ckpt"


def overridden(base: list[str], *extra: str) -> list[str]:
    """``base`` overrides with the keys of ``extra`` replaced by ``extra``'s values: train.py refuses a
    key given twice with different values."""
    keys = {arg.split("=", 1)[0].lstrip("+") for arg in extra}
    return [arg for arg in base if arg.split("=", 1)[0].lstrip("+") not in keys] + list(extra)


# pose_demo on the tiny test ViT: its head (one deconvolution) expects 8-pixel patches.
TINY_POSE_DEMO = ["experiment=pose_demo", "model=vit_tiny", "model.backbone.patch_size=8"]

# Fine-tuning overrides that shrink every demo preset to test size.
TINY_FINETUNE = [
    "model=vit_tiny",
    "task.image_size=[64,48]",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.epoch_length=4",
    "trainer.max_steps=8",
    "trainer.limit_val_batches=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]
