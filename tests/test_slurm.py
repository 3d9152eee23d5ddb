"""slurm/pretrain.sbatch on a real (local, single-node) Slurm cluster: 2 CPU ranks over gloo.

1. A short job trains a tiny MAE with DDP on 2 tasks and writes ONE run directory (named after
   the job id) with metrics.csv and a checkpoint.
2. A longer job gets SIGUSR1 by hand (`scancel --signal=USR1`, what `--signal=USR1@90` does
   before the time limit): Lightning saves hpc_ckpt_1.ckpt and requeues it; the requeued job
   (same id, same run directory) restores that checkpoint and trains on to max_steps.
3. A Hydra sweep through conf/hydra/launcher/slurm.yaml (submitit job array) trains each point.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, overridden
from tests.slurm_cluster import (
    REPO,
    is_final,
    job_info,
    slurm_cluster,  # noqa: F401  (fixture)
    submit,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SCRIPT = REPO / "slurm" / "pretrain.sbatch"


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "GPUS_PER_NODE": "0",  # CPU job: trainer=ddp_cpu, 1 core per task
        "TASKS_PER_NODE": "2",
        "JOB_NAME": "test-pretrain",
        "LOG_DIR": str(tmp_path / "logs"),
        "SAPIENS_OUTPUT_DIR": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _overrides(data_root: Path, max_steps: int, *extra: str) -> list[str]:
    return overridden(TINY, f"data.root={data_root}", f"trainer.max_steps={max_steps}", "logger=csv", *extra)


def _global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _logged_steps(metrics: Path) -> list[int]:
    with metrics.open() as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_two_rank_job_writes_one_run_directory(tmp_path, pretrain_data_root):
    env = _env(tmp_path)
    job = submit(SCRIPT, _overrides(pretrain_data_root, 6), env)
    log = tmp_path / "logs" / f"test-pretrain-{job}.out"
    info = wait_for(job, is_final, timeout=150, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]

    # Both ranks joined one process group of 2 (Lightning's own lines from each rank).
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    # ONE run directory, named after the job id, shared by both ranks.
    runs = list((tmp_path / "runs" / "pretrain").iterdir())
    assert [r.name for r in runs] == [job]
    run = runs[0]
    steps = _logged_steps(run / "metrics.csv")
    assert steps and max(steps) == 5  # steps 0..5 of max_steps=6
    assert _global_step(run / "checkpoints" / "last.ckpt") == 6


def test_usr1_requeues_and_resumes_from_hpc_checkpoint(tmp_path, pretrain_data_root):
    env = _env(tmp_path)
    max_steps = 150
    # Long nominal epochs (no validation in between) and a checkpoint every 5 steps, whose
    # files tell the test how far training got.
    overrides = _overrides(
        pretrain_data_root,
        max_steps,
        "data.epoch_length=1000",
        "callbacks.checkpoint.every_n_train_steps=5",
    )
    job = submit(SCRIPT, overrides, env)
    log = tmp_path / "logs" / f"test-pretrain-{job}.out"
    run = tmp_path / "runs" / "pretrain" / job

    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_0000010.ckpt").exists():
        info = job_info(job)
        assert not is_final(info), f"job ended before step 10: {info['JobState']}"
        assert time.monotonic() < deadline, "no step-10 checkpoint after 120 s"
        time.sleep(0.2)
    assert job_info(job)["JobState"] == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)

    info = wait_for(job, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=60, log=log)
    info = wait_for(job, is_final, timeout=180, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1"

    # Lightning saved the hpc checkpoint mid-run and the requeued job restored it, or a newer one:
    # training goes on until Slurm stops the job, and may pass a periodic checkpoint meanwhile.
    hpc = run / "hpc_ckpt_1.ckpt"
    assert (
        f"Restored all states from the checkpoint at {hpc}" in text
        or f"deleted {hpc}: older than the restored checkpoint" in text
    ), text[-4000:]
    resumed_at = int(re.findall(r"restoring the training state of global step (\d+)", text)[-1])
    assert 10 <= resumed_at < max_steps
    assert "(restart 1)" in text  # the requeued attempt ran (same job id, same log file)
    assert not hpc.exists(), "a finished run must drop its stale hpc checkpoint"
    assert [r.name for r in run.parent.iterdir()] == [job]  # still ONE run directory

    # Training went on from the restored step to the end, not from scratch.
    assert _global_step(run / "checkpoints" / "last.ckpt") == max_steps
    steps = _logged_steps(run / "metrics.csv")
    # Lightning saves the hpc checkpoint from the signal handler, i.e. somewhere inside a training
    # step, so the logged step counter may skip the one step at the resume point.
    assert set(range(resumed_at + 1, max_steps)) <= set(steps)
    assert steps.count(0) <= 1, "step 0 logged twice: the requeued job started from scratch"


def test_hydra_sweep_through_submitit_launcher(tmp_path, pretrain_data_root):
    """`train.py -m hydra/launcher=slurm` submits a 2-point job array (2 ranks each) and waits."""
    env = {k: v for k, v in _env(tmp_path).items() if k in ("WANDB_MODE", "OMP_NUM_THREADS")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer=ddp_cpu",
        *_overrides(pretrain_data_root, 3),
        "seed=0,1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submission = next((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh")).read_text()
    # One requeue mechanism: Lightning's USR1, not submitit's USR2.
    assert "#SBATCH --signal=USR1@90" in submission and "USR2" not in submission
    for point in ("0", "1"):
        run = tmp_path / "sweep" / point
        assert _global_step(run / "checkpoints" / "last.ckpt") == 3, point
        assert max(_logged_steps(run / "metrics.csv")) == 2, point


def test_distillation_job_requeues_with_its_teacher(tmp_path, pretrain_data_root):
    """TASK=pretrain_distill: the hpc checkpoint carries the EMA teacher, centres and schedules, and the
    requeued 2-rank job (Sapiens2 family) restores them and finishes."""
    env = {**_env(tmp_path), "TASK": "pretrain_distill", "JOB_NAME": "test-distill"}
    max_steps = 40
    overrides = overridden(
        [o for o in TINY if not o.startswith("experiment=")],  # train.py refuses a key given twice
        "experiment=pretrain_distill_demo",
        "model=sapiens2_tiny",
        "task.heads.prototypes=64",
        "task.heads.hidden_dim=32",
        "task.heads.bottleneck_dim=16",
        f"data.root={pretrain_data_root}",
        f"trainer.max_steps={max_steps}",
        "data.epoch_length=1000",
        "callbacks.checkpoint.every_n_train_steps=5",
        "logger=csv",
    )
    job = submit(SCRIPT, overrides, env)
    log = tmp_path / "logs" / f"test-distill-{job}.out"
    run = tmp_path / "runs" / "pretrain_distill" / job
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step_0000005.ckpt").exists():
        info = job_info(job)
        assert not is_final(info), f"job ended before step 5: {info['JobState']}"
        assert time.monotonic() < deadline, "no step-5 checkpoint after 180 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    wait_for(job, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=60, log=log)
    info = wait_for(job, is_final, timeout=240, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    hpc = run / "hpc_ckpt_1.ckpt"  # restored, or a newer periodic checkpoint was (as in the test above)
    assert (
        f"Restored all states from the checkpoint at {hpc}" in text
        or f"deleted {hpc}: older than the restored checkpoint" in text
    ), text[-4000:]
    assert "(restart 1)" in text and int(re.findall(r"training state of global step (\d+)", text)[-1]) >= 5
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == max_steps and ckpt["distill"]["schedules"]["step"] == max_steps
    assert "backbone.register_tokens" in ckpt["teacher"]
