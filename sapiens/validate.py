"""``mode=validate``: score a checkpoint on ``data.val_shards`` without training.

    python train.py experiment=pose_coco17_sapiens_0.3b mode=validate \
        task.init_from=sapiens_0.3b_coco_best_coco_AP_796.pth data.val_shards=/shards/coco_val

``task.init_from`` is one of our checkpoints, a published fine-tuned ``.pth`` or a ZeRO-converted file;
its backbone and head must fit the configured task (a file of another task, or a head of another
keypoint or class count, is a one-line error). The run directory gets what a training run's validation
writes: ``config.yaml``, ``metrics.csv`` (``val/...``, found by ``python -m experiments.report``), and per
task the COCO results JSON (pose, ``keypoint_results.json``), the per-class table (seg,
``val_report.md``) and the prediction pictures. The whole val set is scored unless
``trainer.limit_val_batches`` is given on the command line.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from sapiens.checkpoints import load_checkpoint_file
from sapiens.config import ConfigError, validate_config
from sapiens.model_spec import read_model_spec
from sapiens.task_model import state_dict_of

log = logging.getLogger(__name__)


def _command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except ValueError:
        return []


def _prepare(cfg: DictConfig) -> str:
    """Fill what validation does not need, check what it does; returns the checkpoint path."""
    with open_dict(cfg):
        if OmegaConf.is_missing(cfg.data, "train_shards"):
            cfg.data.train_shards = None  # not read in validate mode
        if not any(o.startswith("trainer.limit_val_batches=") for o in _command_line_overrides()):
            cfg.trainer.limit_val_batches = 1.0
    validate_config(cfg)
    path = cfg.task.get("init_from")
    if not path:
        raise ConfigError("config key 'task.init_from': mode=validate needs the checkpoint to score (FILE)")
    if not cfg.data.get("val_shards"):
        raise ConfigError("config key 'data.val_shards': mode=validate needs validation shards")
    return str(path)


def _check_checkpoint(cfg: DictConfig, path: str) -> None:
    """The file must hold a model of the configured task; differences from its own recipe are logged."""
    checkpoint = load_checkpoint_file(path)
    described = isinstance(checkpoint, dict) and ({"sapiens_model", "hyper_parameters"} & set(checkpoint))
    # A published file does not say its input size (Sapiens2 has no position table): the config's is meant.
    overrides = None if described else {"image_size": list(cfg.task.image_size)}
    state = state_dict_of(checkpoint, path)
    spec = read_model_spec(path, checkpoint, state, task=cfg.task.name, overrides=overrides)
    log.info("%s: %s", path, spec.summary())
    if spec.source.startswith(("checkpoint", "hyper_parameters")):
        configured = {"patch_padding": cfg.task.patch_padding, "image_size": tuple(cfg.task.image_size)}
        own = {"patch_padding": spec.patch_padding, "image_size": spec.image_size}
        for key, value in own.items():
            if configured[key] != value:
                log.warning(
                    "%s was trained with %s=%s; the config says %s", path, key, value, configured[key]
                )


def validate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Validate ``task.init_from`` on ``data.val_shards``; returns the logged metrics."""
    from sapiens.run import build_trainer, setup_run

    path = _prepare(cfg)
    _check_checkpoint(cfg, path)
    run_dir, datamodule, module = setup_run(cfg)
    report = module.init_report or {}
    if report.get("missing"):
        raise ConfigError(
            f"{path}: {len(report['missing'])} backbone tensors missing, e.g. '{report['missing'][0]}' "
            "(model= of another family or size?)"
        )
    if not report.get("head"):
        raise ConfigError(
            f"{path}: its {cfg.task.name} head does not fit task.task_head (another keypoint set, class "
            "list or head width?); set them as the file was trained"
        )
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("validating %s -> %s", path, run_dir.resolve())
    trainer.validate(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        log.info("metrics: %s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    return metrics
