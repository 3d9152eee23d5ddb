"""Full-scale experiment presets (conf/experiment/<table>_<size>.yaml): they compose and validate,
hold the published recipes, point at a published table row, and build the published backbones."""

import functools
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from experiments.report import Run, load_tables, match_run
from sapiens.config import ConfigError, validate_config
from sapiens.optim import scaled_lr
from sapiens.run import build_module
from tests.conftest import ROOT

CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*_sapiens_*.yaml"))
SHARDS = ["data.train_shards=/shards/train-000000.tar", "data.val_shards=/shards/val-000000.tar"]
TABLES = load_tables()

# Training instances per published epoch, as documented in each preset's header (COCO train2017:
# persons with a labelled keypoint; the others are the documented estimates of internal sets).
INSTANCES = {
    "pose_coco17": 149_813,
    "pose_coco_wholebody": 149_813,
    "pose_goliath308": 1_000_000,
    "seg_goliath28": 100_000,
    "depth_hi4d": 500_000,
    "normal_thuman2": 500_000,
}
# Backbone parameters of the published models at 1024x1024 with a cls token (reference sapiens.md
# section 1; the model cards' counts include a head).
PUBLISHED_BACKBONE = {"0.3b": 0.307e9, "0.6b": 0.636e9, "1b": 1.141e9, "2b": 2.134e9}


@functools.cache
def _compose(name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


def compose_preset(name: str, overrides: tuple[str, ...] = tuple(SHARDS)):
    """The composed config (cached: tests only read it), with Hydra's runtime set for resolving."""
    cfg = _compose(name, overrides)
    HydraConfig.instance().set_config(cfg)
    return cfg


def table_row(cfg):
    table = TABLES[cfg.experiment_table]
    return table, next(r for r in table.rows if r.id == cfg.experiment_row)


def test_every_published_row_has_a_preset():
    covered = set()
    sapiens2 = sorted(
        p.stem for p in (CONF / "experiment").glob("*_sapiens2_*.yaml")
    )  # test_presets_sapiens2
    for name in PRESETS + sapiens2:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        table = re.search(r"^experiment_table: (\S+)", text, re.M).group(1)
        row = re.search(r"^experiment_row: (\S+)", text, re.M).group(1)
        covered.add((table, row))
    wanted = {(t.name, r.id) for t in TABLES.values() if t.task != "pretrain" for r in t.rows}
    assert wanted <= covered, f"rows without a preset: {sorted(wanted - covered)}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_needs_shards(name):
    cfg = compose_preset(name)
    validate_config(cfg)
    assert OmegaConf.is_missing(compose_preset(name, ()).data, "train_shards")
    with pytest.raises(ConfigError, match="data.train_shards"):
        validate_config(compose_preset(name, ()))
    assert cfg.data.name == "shards"
    assert cfg.trainer.precision == "bf16-mixed"
    size = cfg.model.name.removeprefix("sapiens_")
    assert name.endswith(f"_sapiens_{size}")
    strategy = cfg.trainer.strategy
    big = size in ("1b", "2b")
    assert (not isinstance(strategy, str) and strategy.stage == 2) if big else strategy == "ddp"
    wanted = [1024, 1024] if cfg.task.name == "pretrain" else [1024, 768]
    assert list(cfg.task.image_size) == wanted


@pytest.mark.parametrize("name", PRESETS)
def test_preset_reports_on_its_published_row(name):
    cfg = compose_preset(name)
    if cfg.experiment_table is None:  # pretraining of sizes the published tables do not cover
        assert cfg.task.name == "pretrain" and cfg.model.name != "sapiens_0.3b"
        return
    table, row = table_row(cfg)
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }  # what run.py writes to config.yaml
    notes: list[str] = []
    assert match_run(Run(name, Path(name), resolved, {}), TABLES, notes) == [(table, row)], notes
    assert row.model == cfg.model.name
    if table.task != "pretrain":
        assert table.task == cfg.task.name


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("pretrain_")])
def test_finetune_preset_follows_the_published_recipe_data(name):
    """Each value the published table states for the row (recipe_defaults + row overrides) holds."""
    cfg = compose_preset(name)
    table, row = table_row(cfg)
    recipe = table.recipe(row)
    opt, head = cfg.task.optimizer, cfg.task.task_head
    assert list(cfg.task.image_size) == list(recipe["image_size"])
    if isinstance(recipe.get("layer_decay"), float):
        assert opt.layer_decay == recipe["layer_decay"]
    if opt.lr is None:  # auto-scaled lr: only where the published row says so
        assert "lr_scaling" in recipe and opt.base_lr == recipe["lr"]
    else:
        assert opt.lr == recipe["lr"]
    loss = str(recipe.get("loss", ""))
    if "OHKM" in loss:
        assert head.loss == "ohkm"
        assert head.ohkm_topk == int(re.search(r"topk (\d+)", loss).group(1))
    elif "KeypointMSELoss" in loss:
        assert head.loss == "mse"
    per_gpu = int(re.match(r"(\d+) per GPU", recipe["batch"]).group(1))
    assert cfg.data.batch_size == per_gpu
    # Nominal epoch = one pass over the documented instance count at the published GPU count.
    per_step = per_gpu * int(recipe["gpus"])
    assert cfg.data.epoch_length == math.ceil(INSTANCES[table.name] / per_step)
    assert cfg.trainer.max_steps == recipe["epochs"] * cfg.data.epoch_length
    assert cfg.trainer.limit_val_batches == 1.0  # metrics over the whole val set


KEY_FACTS = [  # reference sapiens.md sections 2 and 3
    (
        "pose_coco17_sapiens_1b",
        {
            "optimizer.layer_decay": 0.85,
            "optimizer.lr": 5e-4,
            "patch_padding": 2,
            "task_head.loss": "mse",
            "task_head.keypoint_set": "coco17",
            "monitor": "val/AP",
        },
    ),
    (
        "pose_coco_wholebody_sapiens_0.3b",
        {"optimizer.layer_decay": 0.75, "task_head.keypoint_set": "coco_wholebody133"},
    ),
    ("pose_coco_wholebody_sapiens_2b", {"optimizer.layer_decay": 0.85}),
    (
        "pose_goliath308_sapiens_1b",
        {
            "optimizer.layer_decay": 0.95,
            "optimizer.lr": 5e-5,
            "task_head.loss": "ohkm",
            "task_head.ohkm_topk": 128,
            "task_head.keypoint_set": "goliath308",
            "patch_padding": 2,
        },
    ),
    ("pose_goliath308_sapiens_0.3b", {"task_head.loss": "ohkm", "optimizer.layer_decay": 0.85}),
    ("pose_goliath308_sapiens_0.6b", {"task_head.loss": "mse", "optimizer.lr": 5e-5}),
    (
        "seg_goliath28_sapiens_1b",
        {
            "patch_padding": 0,
            "monitor": "val/mIoU",
            "monitor_mode": "max",
            "optimizer.layer_decay": 0.85,
            "schedule.warmup_steps": 400,
        },
    ),
    (
        "depth_sapiens_0.3b",
        {
            "patch_padding": 0,
            "task_head.deconv_channels": [384] * 4,
            "task_head.conv_channels": [384, 384],
            "task_head.silog_lambda": 0.5,
        },
    ),
    ("normal_sapiens_2b", {"patch_padding": 2, "task_head.deconv_channels": [768] * 3}),
    (
        "pretrain_sapiens_2b",
        {
            "mask_ratio": 0.75,
            "optimizer.base_lr": 1.5e-4,
            "optimizer.weight_decay": 0.05,
            "schedule.kind": "cosine",
        },
    ),
]


@pytest.mark.parametrize("name,facts", KEY_FACTS, ids=[n for n, _ in KEY_FACTS])
def test_published_key_facts(name, facts):
    task = compose_preset(name).task
    for key, value in facts.items():
        got = OmegaConf.select(task, key)
        got = list(got) if OmegaConf.is_list(got) else got
        assert got == value, f"task.{key}"


def test_wholebody_1b_lr_is_scaled_from_batch_512():
    opt = compose_preset("pose_coco_wholebody_sapiens_1b").task.optimizer
    assert opt.lr is None
    assert scaled_lr(opt.base_lr, 4 * 8, opt.base_batch_size) == pytest.approx(3.125e-5)


def test_pretrain_schedule_is_1600_epochs_of_100_steps():
    for size in PUBLISHED_BACKBONE:
        cfg = compose_preset(f"pretrain_sapiens_{size}")
        assert cfg.data.epoch_length == 100
        assert cfg.trainer.max_steps == 1600 * 100
        assert cfg.task.schedule.warmup_steps == 40 * 100


@pytest.mark.parametrize(
    "name",
    [f"pose_coco17_sapiens_{s}" for s in PUBLISHED_BACKBONE]
    + ["seg_goliath28_sapiens_0.6b", "depth_sapiens_2b"],
)
def test_full_size_module_has_the_published_backbone(name):
    """Built on the meta device (no memory); 1024x768 without cls has (4096 - 3072) pos rows,
    a cls pos row and a cls token fewer than the published 1024x1024 count."""
    cfg = compose_preset(name)
    with torch.device("meta"):
        module = build_module(cfg)
    d = cfg.model.backbone.embed_dim
    count = sum(p.numel() for p in module.backbone.parameters())
    assert module.backbone.patch_embed.proj.padding == (cfg.task.patch_padding,) * 2
    size = cfg.model.name.removeprefix("sapiens_")
    assert round((count + 1026 * d) / 1e9, 3) == PUBLISHED_BACKBONE[size] / 1e9
    assert all(p.device.type == "meta" for p in module.parameters())
