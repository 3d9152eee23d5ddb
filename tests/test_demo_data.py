"""`make demo`'s data step (only the shards the demo reads, a one-line error when the disk is short) and its
depth yardsticks, which the study's table of trivial baselines shares."""

import argparse

import pytest
import torch
from omegaconf import OmegaConf

from experiments.baselines import MEAN_DEPTH_MAP, baseline_metrics, fit_mean_depth_map, mean_depth_map_metrics
from experiments.demo import build_data, summary_table
from experiments.study import trivial_baselines
from experiments.study_report import TRIVIAL, StudyRun
from tests.conftest import run_train


def _args(train_images: int, tasks: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        train_images=train_images, val_images=2, style="simple", max_people=1, tasks=tasks
    )


def test_writes_the_pretraining_and_the_chosen_tasks_shards_only(tmp_path):
    root = tmp_path / "synthhumans"
    assert build_data(_args(3, ["seg", "depth"]), root)
    written = sorted(p.name for p in (root / "shards").iterdir())
    assert written == ["depth", "pretrain", "seg"]
    for kind in written:
        for split in ("train", "val"):
            assert any((root / "shards" / kind / split).glob("*.tar")), (kind, split)


def test_refuses_up_front_when_the_disk_is_too_small(tmp_path, capsys):
    root = tmp_path / "synthhumans"
    assert not build_data(_args(10**9, ["seg"]), root)  # needs petabytes
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root) in err and "--data-dir" in err
    assert not (root / "raw").exists()  # nothing rendered


@pytest.mark.slow
def test_depth_rows_show_the_constant_and_the_mean_depth_map_beside_the_model(synth_root, tmp_path):
    """The demo's table gives depth two yardsticks: the issue's constant depth (the verdict) and the
    image-independent mean depth map, which the per-image scale-and-shift fit can never make worse."""
    run_train(
        [
            "experiment=depth_demo",
            "model=vit_tiny",
            "task.image_size=[64,48]",
            f"data.root={synth_root}",
            f"paths.output_dir={tmp_path}",
            "run_name=demo",
            "logger=csv",
            "data.num_workers=0",
            "data.epoch_length=2",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
        ]
    )
    run_dir = tmp_path / "depth" / "demo"
    cfg = OmegaConf.load(run_dir / "config.yaml")
    depth_map = fit_mean_depth_map(cfg)
    assert depth_map.shape == (64, 48) and torch.isfinite(depth_map).all()
    assert float(depth_map.min()) >= 0.0 and float(depth_map.max()) <= 1.0  # the normalised target's range
    assert float(depth_map[:16].mean()) != pytest.approx(float(depth_map[-16:].mean()), abs=1e-3)  # a slope
    constant = baseline_metrics(run_dir)["rmse"]
    harder = mean_depth_map_metrics(run_dir)["rmse"]
    assert harder <= constant + 1e-6  # least squares over (scale, shift) includes scale 0
    table, _ = summary_table(tmp_path, "demo", ["depth"])
    rows = [line for line in table.splitlines() if line.startswith("| depth |")]
    assert len(rows) == 2
    assert f"| {constant:.4f} | optimal constant depth |" in rows[0]
    assert f"| {harder:.4f} | {MEAN_DEPTH_MAP} |" in rows[1]
    # The study's table of trivial baselines shows both too.
    study_rows = trivial_baselines([StudyRun("depth", "full", "mae", 0, run_dir)])
    assert [(task, what) for task, what, _ in study_rows] == [
        ("depth", TRIVIAL["depth"]),
        ("depth", MEAN_DEPTH_MAP),
    ]
    assert [value for *_, value in study_rows] == pytest.approx([constant, harder], abs=1e-6)
