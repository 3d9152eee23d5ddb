"""End-to-end pretraining through train.py on generated shards: outputs, resume, DDP, bad input."""

import csv
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, run_train

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def test_pretrain_run_writes_everything(pretrain_data_root, tmp_path):
    args = [
        *TINY,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "run_name=e2e",
        "trainer.max_steps=30",
        "task.callbacks.reconstruction.every_n_steps=10",
        "logger=default",
    ]  # csv + wandb (offline: no API key in tests)
    run_train(args)
    run_dir = tmp_path / "pretrain" / "e2e"
    rows = read_metrics(run_dir)
    losses = column(rows, "train/loss")
    assert len(losses) >= 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])  # learning
    for key in (
        "train/lr",
        "train/grad_norm",
        "perf/images_per_s",
        "perf/tokens_per_s",
        "data/skipped_samples",
        "val/loss",
    ):
        assert column(rows, key), f"{key} missing from metrics.csv"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.rank0.log").exists()
    log = (run_dir / "train.rank0.log").read_text()
    assert "effective batch 8" in log
    assert ("keeps freed memory" in log) is sys.platform.startswith("linux")  # cpu_keep_freed_memory
    pictures = sorted((run_dir / "reconstructions").glob("step_*.png"))
    assert [p.name for p in pictures] == ["step_0000010.png", "step_0000020.png", "step_0000030.png"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run not written"


def test_resume_continues_at_the_same_step_with_the_same_weights(pretrain_data_root, tmp_path):
    """A run resumed from its step-5 checkpoint ends with the weights of the uninterrupted run."""
    common = [
        *TINY,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "trainer.max_steps=10",
        "callbacks.checkpoint.every_n_train_steps=5",
        "callbacks.checkpoint.save_top_k=-1",
    ]
    run_train([*common, "run_name=straight"])
    straight = tmp_path / "pretrain" / "straight"
    resumed = tmp_path / "pretrain" / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000005.ckpt", resumed / "checkpoints" / "last.ckpt")
    proc = run_train([*common, "run_name=resumed"])  # ckpt_path=auto finds last.ckpt
    assert "Restoring states from the checkpoint" in proc.stderr + proc.stdout
    final = "step_0000010.ckpt"
    a = torch.load(straight / "checkpoints" / final, map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / final, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 10
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], atol=1e-6)
    steps = column(read_metrics(resumed), "step")
    assert min(steps) >= 5  # logging continued from step 5, not from 0


def test_two_process_ddp_on_cpu(pretrain_data_root, tmp_path):
    args = [
        *TINY,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "run_name=ddp",
        "logger=csv",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
    ]
    proc = run_train(args)
    out = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1" in out and "MEMBER: 2/2" in out
    runs = list((tmp_path / "pretrain").iterdir())
    assert [r.name for r in runs] == ["ddp"]  # both ranks share rank 0's run directory
    run_dir = runs[0]
    assert "effective batch 16 = 8 per device x 2 devices" in (run_dir / "train.rank0.log").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6


def test_missing_shards_fail_clearly(tmp_path):
    proc = run_train(
        [*TINY, f"data.root={tmp_path / 'nowhere'}", f"paths.output_dir={tmp_path}", "logger=csv"],
        check=False,
    )
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr.splitlines()[-1]


def test_nonfinite_losses_skip_updates_then_stop(pretrain_data_root, tmp_path):
    proc = run_train(
        [
            *TINY,
            f"data.root={pretrain_data_root}",
            f"paths.output_dir={tmp_path}",
            "run_name=nan",
            "logger=csv",
            "task.optimizer.lr=1e30",
            "task.max_consecutive_nonfinite=3",
            "trainer.gradient_clip_val=null",
            "cpu_keep_freed_memory=false",  # glibc's default malloc policy: the run works the same
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "3 consecutive non-finite losses" in proc.stderr
    log = (tmp_path / "pretrain" / "nan" / "train.rank0.log").read_text()
    assert "update skipped (1 in a row" in log
    assert "keeps freed memory" not in log


def test_rerun_in_same_directory_resumes_and_keeps_metrics_history(pretrain_data_root, tmp_path):
    common = [
        *TINY,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "run_name=again",
    ]
    run_train([*common, "trainer.max_steps=5"])
    run_train([*common, "trainer.max_steps=10"])  # same run directory: resumes from last.ckpt
    run_dir = tmp_path / "pretrain" / "again"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10
    steps = sorted(set(column(read_metrics(run_dir), "step")))
    assert steps[0] < 5 and steps[-1] >= 9  # the first run's rows are still there
    assert not list(run_dir.glob("checkpoints/*.tmp"))


def test_brace_pattern_needs_no_extra_quoting(pretrain_data_root, tmp_path):
    shards = pretrain_data_root / "shards" / "pretrain" / "train"
    proc = run_train(
        [
            *TINY,
            "data=shards",
            f"data.train_shards={shards}/shard-{{000000..000003}}.tar",
            "data.val_shards=null",
            f"paths.output_dir={tmp_path}",
            "logger=csv",
            "trainer.max_steps=2",
            "data.num_workers=0",
            "data.batch_size=8",
        ]
    )
    assert proc.returncode == 0


def test_pretrain_with_the_resize_on_the_device(pretrain_data_root, tmp_path):
    """``resize_on=device``: workers only decode, the module crops and resizes after the transfer
    (on CPU here, which is slower but exercises the same code); ``auto`` picks the worker on CPU."""
    args = [
        *TINY,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "run_name=dev",
        "logger=csv",
        "trainer.max_steps=6",
        "task.callbacks.reconstruction.every_n_steps=3",
        "task.train_transform.resize_on=device",
        "task.train_transform.fast_decode=true",
    ]
    run_train(args)
    run_dir = tmp_path / "pretrain" / "dev"
    rows = read_metrics(run_dir)
    losses = column(rows, "train/loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert column(rows, "val/loss") and column(rows, "perf/images_per_s")
    assert len(list((run_dir / "reconstructions").glob("step_*.png"))) == 2
    log = (run_dir / "train.rank0.log").read_text()
    assert "resize_on=auto -> worker (trainer.accelerator=cpu)" in log  # the val transform
