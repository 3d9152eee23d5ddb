"""Mistakes that can be seen from the config are refused before anything starts.

:func:`preflight` checks, in this order and cheaply (no model is built, no checkpoint read in full):
the config's values (:func:`sapiens.config.validate_config`, e.g. a pose head that would not fit the
patch size), that the shards exist (saying how to make them when they do not), that the run directory
and the checkpoint folder can be written, and that the checkpoint to resume from or initialise from
loads. :class:`PreflightCallback` (a Hydra callback, ``conf/hydra/default.yaml``) runs it before Hydra
creates the run directory, so a refused run leaves no run directory, wandb run or log behind;
``sapiens.run.run`` runs it too (multirun and Slurm-array jobs do not pass through the callback), once
per run directory and process.
"""

from __future__ import annotations

import copy
import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sapiens.checkpoints import read_checkpoint
from sapiens.config import ConfigError, validate_config
from sapiens.data.shard_urls import expand_shards
from sapiens.disk import check_writable_dir
from sapiens.resume import check_ckpt_path, find_resume_checkpoint

# `python -m data.make_shards <subcommand>` that writes the shards of each reader.
MAKE_SHARDS = {
    "pretrain": "images --src <image folder> --out <shard folder>",
    "pose": "coco --ann <person_keypoints.json> --images <image folder> --out <shard folder>",
    "seg": "seg --images <image folder> --labels <label folder> --out <shard folder>",
    "depth": "depth --images <images> --arrays <depth .npy folder> --masks <masks> --out <shard folder>",
    "normal": "normal --images <images> --arrays <normal .npy folder> --masks <masks> --out <shard folder>",
}

_checked: set[str] = set()  # run directories checked in this process


def how_to_make_data(cfg: DictConfig) -> str:
    """The command that makes the shards ``cfg.data`` points at."""
    if cfg.data.get("name") == "synthhumans":
        return f"generate them with `python -m data.synthhumans.shards --root {cfg.data.root}`"
    sub = MAKE_SHARDS.get(cfg.task.get("reader"), "--help")
    return f"convert your data with `python -m data.make_shards {sub}` (see --help)"


def check_data(cfg: DictConfig) -> None:
    """The training (and validation) shards exist."""
    for key in ("train_shards", "val_shards"):
        spec = cfg.data.get(key)
        if spec is None:
            continue
        spec = spec if isinstance(spec, str) else [str(s) for s in spec]
        try:
            expand_shards(spec)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"data.{key}: {err}; {how_to_make_data(cfg)}") from None


def checkpoint_dirs(cfg: DictConfig) -> list[str]:
    """Folders the run's ModelCheckpoint callbacks write to."""
    specs = {**(cfg.get("callbacks") or {}), **(cfg.task.get("callbacks") or {})}
    dirs = [str(spec.dirpath) for spec in specs.values() if spec is not None and spec.get("dirpath")]
    return list(dict.fromkeys(dirs))


def check_outputs(cfg: DictConfig) -> None:
    """The run directory and the checkpoint folders are (or can be made) writable folders."""
    check_writable_dir(cfg.paths.run_dir, "the run directory")
    for folder in checkpoint_dirs(cfg):
        check_writable_dir(folder, "the checkpoint folder")


def check_checkpoints(cfg: DictConfig, resume: bool = True) -> None:
    """``ckpt_path`` (an explicit file, or ``auto``: the run directory's; with ``resume``) and
    ``task.init_from`` load."""
    spec = cfg.get("ckpt_path") if resume else None
    if spec == "auto":
        find_resume_checkpoint(cfg.paths.run_dir)  # raises when there are checkpoints but none loads
    elif spec not in (None, "null", "none", "last", "best", "hpc"):
        check_ckpt_path(spec)
    init_from = cfg.task.get("init_from")
    if init_from:
        try:
            read_checkpoint(init_from, mmap=True)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"config key 'task.init_from': {err}") from None


def preflight(cfg: DictConfig) -> None:
    """Run every check of the module docstring (once per run directory and process).

    Raises:
        ConfigError, FileNotFoundError, CheckpointError, OSError: the first mistake, in one line.
    """
    run_dir = str(cfg.paths.run_dir)
    if run_dir in _checked:
        return
    if cfg.get("mode", "fit") == "validate":
        # sapiens.validate checks the config (no training keys needed) and, first of all, that the
        # checkpoint holds a model of this task; the data is checked after that.
        check_outputs(cfg)
        check_checkpoints(cfg, resume=False)
    else:
        validate_config(cfg)
        check_data(cfg)
        check_outputs(cfg)
        check_checkpoints(cfg)
    _checked.add(run_dir)


class PreflightCallback(Callback):
    """Hydra callback: :func:`preflight` before Hydra creates the run directory (single runs)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from sapiens.errors import exit_on_user_error

        job = copy.deepcopy(config)
        with read_write(job), open_dict(job):
            run_dir = os.path.abspath(str(OmegaConf.select(job, "hydra.run.dir")))
            del job["hydra"]
            job.paths.run_dir = run_dir  # ${hydra:runtime.output_dir} is only set once the job runs
        try:
            preflight(job)
        except Exception as err:
            exit_on_user_error(err)  # one line and exit; anything else is a bug: its traceback
            raise
