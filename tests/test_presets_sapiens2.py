"""Sapiens2 presets (conf/experiment/<task>_sapiens2_<size>.yaml): they compose and validate, carry the
published recipe of reference sapiens2.md section 3, report on their row, and build the published model."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.report import Run, match_run
from sapiens.config import validate_config
from sapiens.run import build_module
from tests.test_presets import SHARDS, TABLES, compose_preset

TASKS = ("pose", "seg", "normal", "pointmap")
SIZES = ("0.4b", "0.8b", "1b", "5b")
# reference sapiens2.md section 3: (iterations, batch per GPU)
ITERS = {
    "pose": {"0.4b": (10_000, 6), "0.8b": (10_000, 12), "1b": (20_000, 7), "5b": (20_000, 2)},
    "seg": {"0.4b": (20_000, 12), "0.8b": (30_000, 5), "1b": (20_000, 8), "5b": (50_000, 2)},
    "normal": {"0.4b": (20_000, 20), "0.8b": (10_000, 12), "1b": (40_000, 7), "5b": (40_000, 3)},
    "pointmap": {"0.4b": (20_000, 8), "0.8b": (20_000, 6), "1b": (40_000, 3), "5b": (40_000, 1)},
}
LAYER_DECAY = {"0.4b": 0.8, "0.8b": 0.85, "1b": 0.9, "5b": 0.94}
PRESETS = [(t, s) for t in TASKS for s in SIZES]


def test_there_is_one_preset_per_published_task_and_size():
    found = {
        p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*_sapiens2_*")
    }
    assert found == {f"{t}_sapiens2_{s}" for t, s in PRESETS}


@pytest.mark.parametrize("task,size", PRESETS)
def test_preset_holds_the_published_recipe(task, size):
    cfg = compose_preset(f"{task}_sapiens2_{size}", tuple(SHARDS))
    validate_config(cfg)
    t = cfg.task
    assert cfg.model.name == f"sapiens2_{size}" and cfg.model.backbone.family == "sapiens2"
    assert t.name == task and list(t.image_size) == [1024, 768] and t.patch_padding == 0
    assert t.optimizer.layer_decay == LAYER_DECAY[size]
    assert t.optimizer.lr == (1e-4 if size == "5b" and task != "seg" else 5e-4)
    assert list(t.optimizer.betas) == [0.9, 0.999] and t.optimizer.weight_decay == 0.1
    assert (t.schedule.kind, t.schedule.warmup_steps, t.schedule.warmup_start_factor) == ("linear", 500, 1e-3)
    clip = 2.0 if size == "0.4b" or (task, size) == ("pointmap", "0.8b") else 4.0
    assert cfg.trainer.gradient_clip_val == clip and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.grad_checkpointing == (task != "pose")
    iters, batch = ITERS[task][size]
    assert cfg.trainer.max_steps == iters and cfg.data.batch_size == batch
    assert cfg.data.epoch_length <= iters  # validated at least once
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }
    notes: list[str] = []
    [(table, row)] = match_run(Run("r", Path("r"), resolved, {}), TABLES, notes)
    assert (table.name, row.model) == (f"sapiens2_{task}", f"sapiens2_{size}")
    assert table.recipe(row)["iterations"] == iters and table.recipe(row)["layer_decay"] == LAYER_DECAY[size]


@pytest.mark.parametrize(
    "name,head_key,shape",
    [
        ("pose_sapiens2_1b", "deconv_layers.3.weight", (1536, 1024, 4, 4)),
        ("pose_sapiens2_0.8b", "conv_pose.weight", (308, 256, 1, 1)),
        ("seg_sapiens2_0.4b", "conv_seg.weight", (29, 64, 1, 1)),
        ("normal_sapiens2_5b", "upsample_blocks.0.0.weight", (4 * 1536, 2432, 3, 3)),
        ("pointmap_sapiens2_5b", "upsample_blocks.3.0.weight", (4 * 768, 768, 3, 3)),
        ("pointmap_sapiens2_1b", "scale_final_layer.1.weight", (512, 6144)),
    ],
)
def test_full_size_module_has_the_published_head(name, head_key, shape):
    """Built on the meta device: the preset's head has the published per-size widths."""
    cfg = compose_preset(name, tuple(SHARDS))
    with torch.device("meta"):
        module = build_module(cfg)
    assert tuple(module.task.head.state_dict()[head_key].shape) == shape
    assert module.backbone.patch_embed.proj.padding == (0, 0)
