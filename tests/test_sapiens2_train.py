"""Sapiens2 through train.py: MAE pretraining of a Sapiens2 encoder and fine-tuning of each Sapiens2 task."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.synthhumans import render_sample
from sapiens.checkpoints import to_published_layout, write_safetensors
from sapiens.predict import Predictor
from tests.conftest import ROOT, TINY, TINY_FINETUNE, overridden, run_train

pytestmark = pytest.mark.slow


def column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


@pytest.fixture(scope="session")
def sapiens2_pretrain_run(synth_root, tmp_path_factory) -> Path:
    """A tiny Sapiens2 MAE run (sapiens2_tiny, 64x48, 16 steps) made through train.py on SynthHumans."""
    out = tmp_path_factory.mktemp("s2_pretrain")
    data = [f"data.root={synth_root}", f"paths.output_dir={out}"]
    run_train(
        overridden(TINY, "model=sapiens2_tiny", *data, "run_name=pre", "logger=csv", "trainer.max_steps=16")
    )
    return out / "pretrain" / "pre"


def test_mae_pretrains_a_sapiens2_encoder(sapiens2_pretrain_run):
    """task=pretrain with a Sapiens2 encoder: the loss falls; the checkpoint holds the registers and RoPE."""
    losses = column(sapiens2_pretrain_run, "train/loss")
    assert len(losses) >= 12 and sum(losses[-4:]) < sum(losses[:4])
    ckpt = torch.load(
        sapiens2_pretrain_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    state = ckpt["state_dict"]
    assert state["model.encoder.register_tokens"].shape == (1, 8, 64)
    assert "model.encoder.rope_embed.periods" in state


GOLIATH_TO_SAPIENS2 = "[" + ",".join(str(i if i < 2 else i + 1) for i in range(28)) + "]"
TASKS = {
    "pose": (
        "val/AP",
        ["task=sapiens2_pose", "task.task_head.keypoint_set=coco17",
         "task.task_head.head.deconv_channels=[32,32]", "task.task_head.head.conv_channels=[16,16,16]"],
    ),
    "seg": (
        "val/mIoU",
        ["task=sapiens2_seg", "task.task_head.head.deconv_channels=[16,16,16,16]",
         "task.task_head.head.conv_channels=[16,16]",
         f"task.train_transform.label_map={GOLIATH_TO_SAPIENS2}"],
    ),
    "normal": (
        "val/mean_angular_error",
        ["task=sapiens2_normal", "task.task_head.head.upsample_channels=[16,16,16,16]",
         "task.task_head.head.conv_channels=[8,8,8]"],
    ),
    "pointmap": (
        "val/l2",
        ["experiment=pointmap_demo", "task.task_head.canonical_focal=48",
         "task.task_head.head.scale_strides=[2,1,1]"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sapiens2_task_fine_tunes_through_train_py(task, synth_root, sapiens2_pretrain_run, tmp_path):
    metric, overrides = TASKS[task]
    tiny = [o for o in TINY_FINETUNE if not o.startswith("model=")]
    paths = [f"data.root={synth_root}", f"paths.output_dir={tmp_path}", "run_name=ft"]
    run_train(
        [
            *overrides,
            *tiny,
            "model=sapiens2_tiny",
            *paths,
            f"task.init_from={sapiens2_pretrain_run / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    run_dir = tmp_path / task / "ft"
    values = column(run_dir, metric)
    assert len(values) >= 2 and all(v == v for v in values)  # validated after each nominal epoch, no NaN
    losses = column(run_dir, "train/loss")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    assert sorted((run_dir / "predictions").glob("*.png"))
    log = (run_dir / "train.rank0.log").read_text()
    assert "loaded 74 backbone tensors" in log  # every tensor of the Sapiens2 MAE encoder
    if task == "seg":
        assert "Eyeglass" in (run_dir / "val_report.md").read_text()
    if task == "pointmap":
        assert column(run_dir, "train/loss_normal") and column(run_dir, "val/depth_rmse")
        # Inference: mode=validate on the run's weights in the published layout (.safetensors, no
        # description inside) reproduces the run's last validation; predict reads our checkpoint as is.
        last = run_dir / "checkpoints" / "last.ckpt"
        state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        published = {f"backbone.{k}": v for k, v in to_published_layout(backbone, "sapiens2").items()}
        published.update({f"decode_head.{k[10:]}": v for k, v in state.items() if k.startswith("task.head.")})
        released = write_safetensors(published, tmp_path / "sapiens2_tiny_pointmap.safetensors")
        run_train([*overrides, *tiny, "model=sapiens2_tiny", *paths[:2], "run_name=check", "mode=validate",
                   f"task.init_from={released}"])  # fmt: skip
        assert column(tmp_path / task / "check", metric) == [pytest.approx(values[-1], rel=1e-5)]
        image = render_sample(0, height=128, width=96, max_people=1)["image"]
        points = Predictor(last, device="cpu")(image).pointmap.points
        assert points.shape == (3, 128, 96) and np.isfinite(points).all()


def test_sapiens2_model_composes_with_cfg_job():
    """The command of the issue (every size composes and validates in tests/test_configs.py)."""
    proc = run_train(["model=sapiens2_5b", "--cfg", "job"])
    assert "family: sapiens2" in proc.stdout and "embed_dim: 2432" in proc.stdout


def test_study_runs_with_a_sapiens2_backbone(tmp_path):
    """`python -m experiments.study --model sapiens2_tiny`: MAE on the Sapiens2 encoder, then fine-tunes
    (pose here; tests/test_study.py runs seg with every init). ``--inits mae random``: no distillation."""
    cmd = [sys.executable, "-m", "experiments.study", "--smoke", "--model", "sapiens2_tiny",
           "--tasks", "pose", "--inits", "mae", "random",
           "--out-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "runs" / "pretrain" / "mae" / "config.yaml").read_text())
    assert config["model"]["backbone"]["family"] == "sapiens2"
    finetune = yaml.safe_load((tmp_path / "runs" / "pose" / "full_mae_s0" / "config.yaml").read_text())
    assert finetune["model"]["backbone"]["family"] == "sapiens2"
    assert not (tmp_path / "runs" / "pretrain_distill").exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "pose").iterdir()) == [
        f"{arm}_{init}_s{seed}" for arm in ("frozen", "full") for init in ("mae", "random") for seed in (0, 1)
    ]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| full | pose | OKS AP | mae |" in readme and "| frozen | pose | random | 1 |" in readme
    assert "model `sapiens2_tiny`" in readme and "ahead of mae" not in readme
