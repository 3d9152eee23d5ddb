"""One training run, from a composed Hydra config to a fitted model.

``train.py`` calls :func:`run`. The flow: validate the config -> seed -> build the data module (shards ->
decoded, augmented batches), the LightningModule (``task._target_``) and the Trainer (``trainer``,
``logger``, ``callbacks``) -> ``fit`` (resuming from the newest checkpoint that loads, see
``sapiens/resume.py``) -> ``validate`` on the final weights.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from sapiens.callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from sapiens.callbacks.compile_time import CompileTimeLogger
from sapiens.config import TASK_ONLY_KEYS
from sapiens.console import quiet_third_party_noise
from sapiens.cpu_malloc import keep_freed_memory
from sapiens.data.datamodule import ShardDataModule
from sapiens.models.regional_compile import compile_options, compile_regions
from sapiens.preflight import preflight
from sapiens.resume import drop_hpc_checkpoints, resolve_ckpt_path

log = logging.getLogger(__name__)
# Lightning 2.6 with torch >= 2.10 warns about its own pytree use on every batch; nothing for users to do.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def build_datamodule(cfg: DictConfig) -> ShardDataModule:
    """Shards of ``cfg.data`` read with the task's reader and transforms."""
    data = cfg.data
    return ShardDataModule(
        train_shards=data.train_shards,
        val_shards=data.get("val_shards"),
        reader=cfg.task.reader,
        train_transform=build_transform(cfg.task.train_transform, cfg.trainer.accelerator),
        val_transform=build_transform(cfg.task.get("val_transform"), cfg.trainer.accelerator),
        batch_size=data.batch_size,
        val_batch_size=data.get("val_batch_size"),
        num_workers=data.num_workers,
        resampled=data.resampled,
        epoch_length=data.epoch_length,
        shuffle_buffer=data.shuffle_buffer,
        seed=cfg.seed,
        pin_memory=_auto(data.get("pin_memory", "auto"), cfg.trainer.accelerator != "cpu"),
        max_consecutive_skips=data.get("max_consecutive_skips", 10_000),
        max_skip_seconds=data.get("max_skip_seconds", 300),
    )


def _auto(value, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def build_transform(spec: DictConfig | None, accelerator: str):
    """Instantiate a sample transform; ``resize_on: auto`` becomes ``device`` on an accelerator
    and ``worker`` on CPU, where a resize in the main process would only slow the step down."""
    if spec is None:
        return None
    if spec.get("resize_on") == "auto":
        where = "worker" if accelerator == "cpu" else "device"
        spec = OmegaConf.merge(spec, {"resize_on": where})
        log.info("%s: resize_on=auto -> %s (trainer.accelerator=%s)", spec._target_, where, accelerator)
    return instantiate(spec)


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The task's LightningModule: ``cfg.task`` minus the keys in :data:`TASK_ONLY_KEYS`."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return instantiate({k: v for k, v in task.items() if k not in TASK_ONLY_KEYS}, _convert_="all")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks of ``cfg.callbacks`` plus the task's own (``cfg.task.callbacks``); null entries drop one.
    With ``compile`` on, the first steps' times are logged too."""
    specs = {**(cfg.get("callbacks") or {}), **(cfg.task.get("callbacks") or {})}
    callbacks = [instantiate(spec) for spec in specs.values() if spec is not None]
    if cfg.get("compile") not in (None, False):
        callbacks.append(CompileTimeLogger())
    return callbacks


def compile_module(cfg: DictConfig, module: L.LightningModule) -> None:
    """``compile``: torch.compile the module region by region, in place (state_dict keys unchanged)."""
    spec = cfg.get("compile")
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    options = compile_options(spec)
    if options is not None:
        compile_regions(module, **options)


def set_matmul_precision(cfg: DictConfig) -> None:
    """``float32_matmul_precision`` on CUDA runs: ``high`` lets fp32 matmuls and convs use TF32."""
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        return
    precision = cfg.get("float32_matmul_precision", "high")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    log.info(
        "fp32 matmul precision on CUDA: %s (TF32 %s)", precision, "off" if precision == "highest" else "on"
    )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Lightning Trainer from ``cfg.trainer`` with loggers, callbacks and atomic checkpoint writes."""
    loggers = [instantiate(spec) for spec in (cfg.get("logger") or {}).values() if spec is not None]
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    callbacks = build_callbacks(cfg)
    if not kwargs.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    plugins = []
    if "deepspeed" not in str(kwargs.get("strategy")).lower():
        plugins.append(AtomicCheckpointIO())  # DeepSpeed writes checkpoint folders itself
    return L.Trainer(
        default_root_dir=cfg.paths.run_dir,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=plugins,
        **kwargs,
    )


def set_cpu_threads(cfg: DictConfig) -> None:
    """Intra-op threads for CPU training. ``auto`` leaves one core per data worker: oversubscribed OpenMP
    threads spin against the workers and can slow a CPU run down by an order of magnitude."""
    spec = cfg.get("cpu_threads", "auto")
    if spec is None or cfg.trainer.get("accelerator") != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores - cfg.data.num_workers) if spec == "auto" else int(spec)
    devices = cfg.trainer.get("devices")
    if "ddp" in str(cfg.trainer.get("strategy")) and isinstance(devices, int) and devices > 1:
        threads = max(1, threads // devices)  # processes of one node share its cores
    torch.set_num_threads(threads)
    log.info("CPU threads per process: %d (cpu_threads=%s)", threads, spec)


def setup_run(cfg: DictConfig) -> tuple[Path, ShardDataModule, L.LightningModule]:
    """What fitting and ``mode=validate`` start with: CPU threads, seed, the run directory, data, module."""
    set_cpu_threads(cfg)
    if (
        cfg.trainer.get("accelerator") == "cpu"
        and cfg.get("cpu_keep_freed_memory", True)
        and keep_freed_memory()
    ):
        log.info("glibc malloc keeps freed memory (cpu_keep_freed_memory=true): steps do not re-fault it")
    set_matmul_precision(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    compile_module(cfg, module)  # `compile`: in place, before any strategy wraps it
    return run_dir, datamodule, module


def run(cfg: DictConfig) -> dict[str, float]:
    """Check, build, fit and validate; returns the final metrics (``trainer.callback_metrics``).

    ``mode=validate`` only scores ``task.init_from`` (:func:`sapiens.validate.validate_checkpoint`)."""
    quiet_third_party_noise()
    preflight(cfg)  # config, data, writable outputs, checkpoints: before anything is built
    if cfg.get("mode", "fit") == "validate":
        from sapiens.validate import validate_checkpoint  # it builds with this module's functions

        return validate_checkpoint(cfg)
    run_dir, datamodule, module = setup_run(cfg)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run directory: %s", run_dir.resolve())
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    drop_hpc_checkpoints(trainer, run_dir)
    if cfg.get("validate_after_fit") and cfg.data.get("val_shards"):
        trainer.validate(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
