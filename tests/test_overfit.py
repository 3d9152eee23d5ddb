"""Each task can learn: fine-tuning on 16 fixed SynthHumans images and validating on the same images
reaches near-perfect metrics through the real train.py, FinetuneModule, Lightning trainer and metrics.

This is the check that targets, head, loss, decoding (flip test included for pose) and metric agree:
a mismatch anywhere (a shifted heatmap, swapped left/right channels, a wrong label id, a mis-scaled
depth) caps the metric far below these bars. Each run takes about a minute of CPU.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import run_train

COMMON = [
    "model=vit_small",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.epoch_length=50",
    "data.shuffle_buffer=16",
    "trainer.limit_val_batches=null",
    "trainer.log_every_n_steps=10",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "cpu_threads=1",  # one thread: a busy 2-core machine makes OpenMP threads spin against each other
    "task.num_pictures=0",
    "task.optimizer.layer_decay=null",
    "task.schedule.warmup_steps=20",
]
# Dense tasks: 64x48 inputs, 8-pixel patches (8x6 tokens), no augmentation, no head dropout.
DENSE = [
    *COMMON,
    "task.image_size=[64,48]",
    "model.backbone.patch_size=8",
    "task.train_transform.train=false",
    "task.task_head.dropout=0",
]
HEAD64 = ["task.task_head.deconv_channels=[64,64]", "task.task_head.conv_channels=[64,64]"]
OVERRIDES = {
    # 128x96 crops with 16-pixel patches; flips in training so that the flip test is exercised too.
    "pose": [
        *COMMON,
        "task.image_size=[128,96]",
        "task.task_head.deconv_channels=[64,64]",
        "task.task_head.conv_channels=[64,64]",
        "task.task_head.sigma=1.5",  # sharp 32x24 targets: memorised to sub-pixel precision
        "task.task_head.flip_test=true",
        "task.optimizer.lr=2e-3",
        "task.train_transform.flip_prob=0.5",
        "task.train_transform.half_body_prob=0",
        "task.train_transform.shift_prob=0",
        "task.train_transform.scale_range=[1,1]",
        "task.train_transform.rotate_prob=0",
        "task.train_transform.photometric=false",
        "task.train_transform.blur_prob=0",
        "task.train_transform.median_blur_prob=0",
        "task.train_transform.coarse_dropout_prob=0",
    ],
    "seg": [*DENSE, *HEAD64, "task.optimizer.lr=6e-3"],
    "depth": [
        *DENSE,
        "task.task_head.deconv_channels=[32,32,32]",
        "task.task_head.conv_channels=[32,32]",
        "task.optimizer.lr=3e-3",  # 6e-3 makes the SiLog loss jump early on
    ],
    "normal": [*DENSE, *HEAD64, "task.optimizer.lr=6e-3"],
}
STEPS = {"pose": 400, "seg": 400, "depth": 300, "normal": 300}
METRIC = {"pose": "val/AP", "seg": "val/mIoU", "depth": "val/rmse", "normal": "val/mean_angular_error"}


@pytest.fixture(scope="module")
def overfit_root(tmp_path_factory) -> Path:
    """16 training images (256x192, 1-3 people each) with the shards of every task."""
    from data.synthhumans.shards import build

    root = tmp_path_factory.mktemp("overfit")
    return build(root, num_train=16, num_val=1, progress=False)


def final_value(run_dir: Path, column: str) -> float:
    """The last logged value of ``column`` (the validation on the final weights)."""
    with open(run_dir / "metrics.csv") as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    assert values, f"{column} never logged in {run_dir}"
    return values[-1]


def overfit(task: str, root: Path, out: Path, steps: int) -> float:
    """Train ``task`` on the 16 training images for ``steps`` steps, validate on the same images."""
    name = f"steps{steps}"
    run_train(
        [
            f"experiment={task}_demo",
            *OVERRIDES[task],
            f"data.root={root}",
            f"data.val_shards={root}/shards/{task}/train",
            f"paths.output_dir={out}",
            f"run_name={name}",
            f"trainer.max_steps={steps}",
        ],
        timeout=900,
    )
    return final_value(out / task / name, METRIC[task])


@pytest.mark.slow
def test_pose_overfits_to_oks_ap_near_one(overfit_root, tmp_path):
    ap = overfit("pose", overfit_root, tmp_path, STEPS["pose"])
    assert ap >= 0.9, f"pose OKS AP {ap:.3f} on its own 16 training images"


@pytest.mark.slow
def test_seg_overfits_to_miou_near_one(overfit_root, tmp_path):
    miou = overfit("seg", overfit_root, tmp_path, STEPS["seg"])
    assert miou >= 0.8, f"seg mIoU {miou:.3f} on its own 16 training images"


@pytest.mark.slow
@pytest.mark.parametrize("task,fraction", [("depth", 0.3), ("normal", 0.2)])
def test_dense_geometry_overfits_to_a_fraction_of_the_untrained_error(task, fraction, overfit_root, tmp_path):
    untrained = overfit(task, overfit_root, tmp_path, 0)  # validation of the initial weights
    trained = overfit(task, overfit_root, tmp_path, STEPS[task])
    assert trained <= fraction * untrained, f"{task}: {trained:.4f} trained vs {untrained:.4f} untrained"
