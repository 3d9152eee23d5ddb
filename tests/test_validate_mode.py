"""``python train.py ... mode=validate``: published, ZeRO-converted and our checkpoints are scored without
training, into a run directory that ``experiments.report`` reads."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments.report import build_report, load_tables
from tests.checkpoint_factory import HEAD_OVERRIDES, make_module, save_published, save_zero_converted
from tests.conftest import TINY_FINETUNE, TINY_POSE_DEMO, overridden, run_train

ROOT = Path(__file__).resolve().parents[1]

MAIN_METRIC = {"pose": "val/AP", "seg": "val/mIoU", "depth": "val/rmse", "normal": "val/mean_angular_error"}


def validate(task: str, ckpt: Path, data_root: Path, out: Path, *extra: str, check: bool = True):
    base = [
        f"experiment={task}_demo",
        *TINY_FINETUNE,
        *HEAD_OVERRIDES[task],
        "task.task_head.sigma=1.5" if task == "pose" else "seed=0",
        f"data.root={data_root}",
        f"paths.output_dir={out}",
        "run_name=val",
        "mode=validate",
        f"task.init_from={ckpt}",
    ]
    return run_train(overridden(base, *extra), check=check)  # a key given twice is refused


def logged(run_dir: Path, column: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,layout", [("seg", "published"), ("depth", "published"), ("normal", "published"), ("depth", "zero")]
)  # pose: published, in the report test below
def test_validate_a_checkpoint_without_training(task, layout, synth_root, tmp_path):
    save = save_published if layout == "published" else save_zero_converted
    ckpt = save(make_module(task), tmp_path / f"{task}.pth")
    validate(task, ckpt, synth_root, tmp_path / "runs", "trainer.limit_val_batches=2")
    run_dir = tmp_path / "runs" / task / "val"
    values = logged(run_dir, MAIN_METRIC[task])
    assert len(values) == 1  # one validation, no training step
    assert "mode: validate" in (run_dir / "config.yaml").read_text()
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("*.ckpt"))
    if task == "seg":
        assert "Face_Neck" in (run_dir / "val_report.md").read_text()
    log = (run_dir / "train.rank0.log").read_text()
    assert "loaded the task head" in log


@pytest.mark.slow
def test_validating_our_checkpoint_reproduces_the_runs_own_validation(synth_root, tmp_path):
    """Train a few steps, then mode=validate on last.ckpt: the same val/mIoU as the run's final validation."""
    out = tmp_path / "runs"
    common = [
        "experiment=seg_demo",
        *TINY_FINETUNE,
        *HEAD_OVERRIDES["seg"],
        f"data.root={synth_root}",
        f"paths.output_dir={out}",
    ]
    run_train(overridden(common, "run_name=train", "trainer.max_steps=2", "data.epoch_length=2"))
    trained = logged(out / "seg" / "train", "val/mIoU")[-1]
    run_train(
        [
            *common,
            "run_name=check",
            "mode=validate",
            f"task.init_from={out / 'seg/train/checkpoints/last.ckpt'}",
        ]
    )
    assert logged(out / "seg" / "check", "val/mIoU") == [pytest.approx(trained, abs=1e-6)]


@pytest.mark.slow
def test_validate_run_is_picked_up_by_the_report(synth_root, tmp_path):
    """A published pose file validated under a published-table preset (tiny model): the report fills
    that row and says it is a validation of the file; the COCO results JSON is written."""
    ckpt = save_published(make_module("pose"), tmp_path / "pose.pth")
    out = tmp_path / "runs"
    run_train(
        [
            "experiment=pose_coco17_sapiens_0.3b",
            *TINY_FINETUNE,
            *HEAD_OVERRIDES["pose"],
            "task.task_head.sigma=1.5",
            "data=synthhumans",
            f"data.root={synth_root}",
            "trainer=cpu",
            f"paths.output_dir={out}",
            "run_name=published_check",
            "mode=validate",
            f"task.init_from={ckpt}",
        ]
    )
    run_dir = out / "pose" / "published_check"
    assert len(logged(run_dir, "val/AP")) == 1 and (run_dir / "keypoint_results.json").exists()
    report = build_report(out, load_tables())
    row = next(
        line
        for line in report.splitlines()
        if line.startswith("| sapiens_0.3b") and "published_check" in line
    )
    assert "validate only (pose.pth)" in row and "missing" not in row


def test_a_checkpoint_of_another_task_is_a_one_line_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from sapiens.run import run

    ckpt = save_published(make_module("seg"), tmp_path / "seg.pth")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *TINY_POSE_DEMO,
                "mode=validate",
                f"task.init_from={ckpt}",
                f"data.root={tmp_path}",
                f"paths.run_dir={tmp_path / 'run'}",
            ],
        )
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert (
        "holds a seg model" in str(err.value) and str(ckpt) in str(err.value) and "\n" not in str(err.value)
    )
