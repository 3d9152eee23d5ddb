"""Sapiens2 through train.py: MAE pretraining of a Sapiens2 encoder and fine-tuning of each Sapiens2 task."""

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, run_train

pytestmark = pytest.mark.slow


def column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def test_mae_pretrains_a_sapiens2_encoder(pretrain_data_root, tmp_path):
    run_train(
        [
            *TINY,
            "model=sapiens2_tiny",
            f"data.root={pretrain_data_root}",
            f"paths.output_dir={tmp_path}",
            "run_name=s2",
            "logger=csv",
            "trainer.max_steps=20",
        ]
    )
    run_dir = tmp_path / "pretrain" / "s2"
    losses = column(run_dir, "train/loss")
    assert len(losses) >= 15 and sum(losses[-5:]) < sum(losses[:5])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert state["model.encoder.register_tokens"].shape == (1, 8, 64)
    assert "model.encoder.rope_embed.periods" in state
