"""Kills, preemptions and full disks, injected into real train.py runs (tests/faults.py): which
checkpoint a rerun restores, what it deletes, and what metrics.csv holds afterwards."""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from sapiens.resume import CheckpointError, find_resume_checkpoint
from tests.conftest import TINY, run_train

pytestmark = pytest.mark.slow


def common(data_root: Path, out: Path, *extra: str, val: bool = False) -> list[str]:
    """TINY runs named ``r`` in ``out``; without validation unless ``val`` (a third faster)."""
    args = [*TINY, f"data.root={data_root}", f"paths.output_dir={out}", "logger=csv", "run_name=r", *extra]
    return args if val else [*args, "data.val_shards=null"]


def kill_after_save(name: str) -> list[str]:
    return ["+callbacks.fault._target_=tests.faults.KillSelf", f"+callbacks.fault.after_save={name}"]


def kill_at_step(step: int) -> list[str]:
    return ["+callbacks.fault._target_=tests.faults.KillSelf", f"+callbacks.fault.at_step={step}"]


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_kill_between_step_file_and_last_ckpt(pretrain_data_root, tmp_path):
    """Killed right after step_9 was written, before last.ckpt (step 6) was: the rerun restores
    step_9, deletes the step_3 the crash left outside the top 2, writes no step_N-v1 file, and deletes
    step_9 itself once it falls out of the top 2 (Lightning keeps the file a run resumed from)."""
    args = common(pretrain_data_root, tmp_path, "trainer.max_steps=15")
    args += ["callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.save_top_k=2"]
    killed = run_train([*args, *kill_after_save("step_0000009.ckpt")], check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "pretrain" / "r"
    ckpts = run_dir / "checkpoints"
    assert names(ckpts) == ["last.ckpt", "step_0000003.ckpt", "step_0000006.ckpt", "step_0000009.ckpt"]
    assert step_of(ckpts / "last.ckpt") == 6

    # Which file a rerun picks, read without loading the tensors: the newest one that loads.
    assert find_resume_checkpoint(run_dir).path == ckpts / "step_0000009.ckpt"
    saved_last = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").unlink()  # no last.ckpt at all: the step files still count
    assert find_resume_checkpoint(run_dir).path == ckpts / "step_0000009.ckpt"
    saved_9 = (ckpts / "step_0000009.ckpt").read_bytes()
    (ckpts / "step_0000009.ckpt").write_bytes(saved_9[: len(saved_9) // 2])  # damaged: the next one
    choice = find_resume_checkpoint(run_dir)
    assert choice.path == ckpts / "step_0000006.ckpt" and choice.step == 6
    assert [p.name for p, _ in choice.unreadable] == ["step_0000009.ckpt"]
    (ckpts / "step_0000009.ckpt").write_bytes(saved_9)
    (ckpts / "last.ckpt").write_bytes(saved_last)

    proc = run_train(args)
    out = proc.stdout + proc.stderr
    assert f"resuming from {ckpts / 'step_0000009.ckpt'} (global step 9" in out
    assert "restoring the training state of global step 9" in out
    assert names(ckpts) == ["last.ckpt", "step_0000012.ckpt", "step_0000015.ckpt"]
    assert step_of(ckpts / "last.ckpt") == 15
    steps = train_steps(run_dir)
    assert [s for s, n in Counter(steps).items() if n > 1] == []  # no step logged twice


def test_preemption_checkpoint_outside_slurm_and_metrics_after_a_kill(pretrain_data_root, tmp_path):
    """A run killed at step 8 (checkpoints every 3) whose newest checkpoint is a Slurm preemption
    checkpoint (step 6; last.ckpt at step 3), rerun without Slurm: the hpc checkpoint is restored and
    deleted only once last.ckpt is newer; metrics.csv holds each step once."""
    args = common(
        pretrain_data_root, tmp_path, "trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=3"
    )
    args.remove("data.val_shards=null")  # validation rows must not be doubled either
    assert run_train([*args, *kill_at_step(8)], check=False).returncode == -9
    run_dir = tmp_path / "pretrain" / "r"
    ckpts = run_dir / "checkpoints"
    assert train_steps(run_dir) == list(range(7))  # written as logged: only the dying step is lost
    (ckpts / "last.ckpt").rename(run_dir / "hpc_ckpt_1.ckpt")  # what a preemption at step 6 leaves
    shutil.copy(ckpts / "step_0000003.ckpt", ckpts / "last.ckpt")

    proc = run_train(args)
    out = proc.stdout + proc.stderr
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'} (global step 6" in out
    assert "restoring the training state of global step 6" in out
    assert "metrics.csv: dropped 1 rows" in out  # step 6, logged before the kill
    assert not (run_dir / "hpc_ckpt_1.ckpt").exists()  # superseded by last.ckpt at step 12
    assert step_of(ckpts / "last.ckpt") == 12
    assert train_steps(run_dir) == list(range(12))  # each step once, in order
    with open(run_dir / "metrics.csv") as f:
        val = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert val and len(val) == len(set(val))


def test_run_directory_whose_checkpoints_do_not_load_is_refused(pretrain_data_root, tmp_path):
    run_dir = tmp_path / "pretrain" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "hpc_ckpt_1.ckpt").write_text("not a checkpoint\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    proc = run_train(common(pretrain_data_root, tmp_path, "trainer.max_steps=2"), check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "none can be restored" in errors[0] and "hpc_ckpt_1.ckpt" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "hpc_ckpt_1.ckpt").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "metrics.csv").exists()  # nothing started
    with pytest.raises(CheckpointError):
        find_resume_checkpoint(run_dir)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for a run's logs, not for its first 2.3 MB checkpoint."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_and_leaves_no_partial_file(pretrain_data_root, tmp_path, small_disk):
    args = [*TINY, f"data.root={pretrain_data_root}", f"paths.output_dir={small_disk}", "logger=csv"]
    args += ["run_name=r", "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3"]
    proc = run_train(args, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    ckpts = small_disk / "pretrain" / "r" / "checkpoints"
    assert (
        errors[0]
        == f"error: no space left on {small_disk} (tmpfs) while writing {ckpts / 'step_0000003.ckpt'}"
    )
    assert "Traceback" not in proc.stderr
    assert list(ckpts.iterdir()) == []  # no partial .tmp left behind
