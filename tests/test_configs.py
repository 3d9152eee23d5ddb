"""Every config file composes and validates; mistakes give one clear line naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from sapiens.config import ConfigError, validate_config
from tests.conftest import ROOT, run_train

CONF = ROOT / "conf"
GROUPS = ["task", "model", "data", "trainer", "logger", "callbacks"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_each_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    if group == "data" and option == "shards":
        with pytest.raises(ConfigError, match="data.train_shards"):
            validate_config(cfg)
        cfg = compose_cfg([f"{group}={option}", "data.train_shards='/x/{0..3}.tar'"])
    validate_config(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    if cfg.data.name == "shards":  # full-scale presets need the user's shards
        cfg = compose_cfg([f"experiment={experiment}", "data.train_shards=/x/a.tar"])
    validate_config(cfg)
    assert cfg.task.image_size[0] % cfg.model.backbone.patch_size == 0


def test_defaults_are_the_published_pretraining_recipe():
    cfg = compose_cfg(["task=pretrain", "model=sapiens_0.3b"])
    assert cfg.task.mask_ratio == 0.75
    assert list(cfg.task.optimizer.betas) == [0.9, 0.95]
    assert cfg.task.optimizer.weight_decay == 0.05
    assert cfg.task.optimizer.base_lr == 1.5e-4 and cfg.task.optimizer.base_batch_size == 256
    assert cfg.trainer.gradient_clip_val == 1.0
    assert (cfg.task.decoder.dim, cfg.task.decoder.depth, cfg.task.decoder.heads) == (512, 8, 16)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("task.mask_ratio=lots", "task.mask_ratio"),
        ("+trainer.max_stepz=5", "trainer.max_stepz"),
        ("+task.mask_ratoi=0.5", "task.mask_ratoi"),
        ("task.image_size=[100,48]", "task.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.backbone.num_heads=5", "model.backbone.num_heads"),
        ("task.reader=video", "task.reader"),
        ("data.pin_memory=sometimes", "data.pin_memory"),
    ],
)
def test_validation_names_the_bad_key(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_typo_suggests_the_right_key():
    cfg = compose_cfg(["+trainer.max_stepz=5"])
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        validate_config(cfg)


def test_cli_reports_one_line_error(tmp_path: Path):
    proc = run_train(["trainer.max_steps=abc", f"paths.output_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "config key 'trainer.max_steps': expected int, got 'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_auto_settings_follow_the_accelerator():
    """data.pin_memory and the pretraining resize_on resolve from trainer.accelerator."""
    from sapiens.run import build_datamodule

    cpu = build_datamodule(compose_cfg(["data.train_shards=/x.tar"]))
    assert cpu.pin_memory is False and cpu.train_transform.resize_on == "worker"
    gpu = build_datamodule(compose_cfg(["data.train_shards=/x.tar", "trainer=gpu"]))
    assert gpu.pin_memory is True and gpu.train_transform.resize_on == "device"
    assert gpu.val_transform.resize_on == "device"
