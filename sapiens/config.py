"""Config validation: one clear line per mistake, before anything is built.

Hydra already rejects overrides of keys that do not exist (struct mode). This module checks what Hydra
cannot: values of the wrong type, trainer keys Lightning does not know, task keys the LightningModule
does not take, image sizes that do not fit the patch size, and missing required values.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import types
import typing
from typing import Any

import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sapiens.models.factory import FAMILIES, backbone_family
from sapiens.models.regional_compile import compile_options

READERS = ("pretrain", "pose", "seg", "depth", "normal", "pointmap")
# Keys of the task config that are not arguments of the LightningModule.
TASK_ONLY_KEYS = (
    "name",
    "reader",
    "train_transform",
    "val_transform",
    "callbacks",
    "monitor",
    "monitor_mode",
)


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or unknown (``key``: the key, when one is to blame)."""

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key '{key}': {message}", key, message)


INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def origin_key(cfg: DictConfig, key: str) -> str:
    """The key whose value ``key`` takes: ``task.batch_size`` -> ``data.batch_size`` when the task
    config says ``batch_size: ${data.batch_size}``, so that errors name the key the user typed."""
    seen = {key}
    while True:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            return key
        raw = OmegaConf.to_container(node, resolve=False).get(leaf)
        match = INTERPOLATION.match(raw) if isinstance(raw, str) else None
        if match is None or match.group(1) in seen:
            return key
        key = match.group(1)
        seen.add(key)


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _matches(value: Any, annotation: Any) -> bool:
    """Loose runtime check of ``value`` against a simple annotation (others pass)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list) or annotation in (tuple, list):
        return isinstance(value, list | tuple | ListConfig)
    if origin is dict or annotation is dict:
        return isinstance(value, dict | DictConfig)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_kwargs(section: str, values: dict, target) -> None:
    """Every key of ``values`` must be a parameter of ``target`` with a value of the annotated type."""
    params = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to no type checks
        hints = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        if key not in params:
            if not takes_kwargs:
                _fail(f"{section}.{key}", "unknown key" + _suggest(key, params))
            continue
        annotation = hints.get(key, params[key].annotation)
        if value is not None and not _matches(value, annotation):
            _fail(f"{section}.{key}", f"expected {_type_name(annotation)}, got {value!r}")


def _positive_int(section: str, key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(f"{section}.{key}", f"expected a positive integer, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key of ``cfg`` (the key the value was given
    under, when it reached the bad place through an interpolation); returns None when all is well."""
    try:
        _validate(cfg)
    except ConfigError as err:
        if err.key is None or origin_key(cfg, err.key) == err.key:
            raise
        key = origin_key(cfg, err.key)
        raise ConfigError(f"config key '{key}': {err.detail}", key, err.detail) from None


def _validate(cfg: DictConfig) -> None:
    try:
        resolved = {
            key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True)
            if OmegaConf.is_config(cfg[key])
            else cfg[key]
            for key in cfg
            if key != "hydra"  # Hydra's own section is Hydra's business
        }
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(
            f"config key '{key}': a value is required (set it on the command line, e.g. {key}=...)"
        ) from None

    for key in ("task", "model", "data", "trainer"):
        if not isinstance(resolved.get(key), dict):
            _fail(key, "missing config group")
    task, model, data = resolved["task"], resolved["model"], resolved["data"]

    threads = resolved.get("cpu_threads", "auto")
    if threads not in ("auto", None) and not (isinstance(threads, int) and threads > 0):
        _fail("cpu_threads", f"expected auto, null or a positive integer, got {threads!r}")
    if resolved.get("mode", "fit") not in ("fit", "validate"):
        _fail("mode", f"expected fit or validate, got {resolved.get('mode')!r}")
    try:
        compile_options(resolved.get("compile"))
    except ValueError as err:
        _fail("compile", str(err).removeprefix("compile: "))
    precision = resolved.get("float32_matmul_precision", "high")
    if precision not in ("highest", "high", "medium"):
        _fail("float32_matmul_precision", f"expected highest, high or medium, got {precision!r}")
    if not isinstance(resolved.get("seed"), int):
        _fail("seed", f"expected an integer, got {resolved.get('seed')!r}")

    # model
    backbone = model.get("backbone") or {}
    if backbone_family(backbone) not in FAMILIES:
        _fail(
            "model.backbone.family", f"expected one of {sorted(FAMILIES)}, got {backbone_family(backbone)!r}"
        )
    for key in ("embed_dim", "depth", "num_heads", "patch_size"):
        _positive_int("model.backbone", key, backbone.get(key))
    if backbone["embed_dim"] % backbone["num_heads"]:
        _fail(
            "model.backbone.num_heads",
            f"embed_dim {backbone['embed_dim']} is not divisible by {backbone['num_heads']} heads",
        )

    # task
    if task.get("reader") not in READERS:
        _fail("task.reader", f"expected one of {', '.join(READERS)}, got {task.get('reader')!r}")
    size = task.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        _fail("task.image_size", f"expected [height, width] integers, got {size!r}")
    patch = backbone["patch_size"]
    if size[0] % patch or size[1] % patch:
        _fail("task.image_size", f"{size} is not divisible by the patch size {patch}")
    try:
        module_cls = get_class(task["_target_"])
    except Exception as err:
        _fail("task._target_", f"cannot import {task.get('_target_')!r} ({err})")
    module_kwargs = {k: v for k, v in task.items() if k not in TASK_ONLY_KEYS}
    check_kwargs("task", module_kwargs, module_cls.__init__)

    # data
    for key in ("batch_size",):
        _positive_int("data", key, data.get(key))
    _positive_int("data", "epoch_length", data.get("epoch_length"), allow_none=True)
    if not isinstance(data.get("num_workers"), int) or data["num_workers"] < 0:
        _fail("data.num_workers", f"expected an integer >= 0, got {data.get('num_workers')!r}")
    if not isinstance(data.get("resampled"), bool):
        _fail("data.resampled", f"expected true or false, got {data.get('resampled')!r}")
    if data.get("pin_memory", "auto") not in ("auto", True, False):
        _fail("data.pin_memory", f"expected auto, true or false, got {data.get('pin_memory')!r}")
    if not data.get("train_shards") and resolved.get("mode", "fit") == "fit":
        _fail("data.train_shards", "no training shards given")
    _positive_int("data", "max_consecutive_skips", data.get("max_consecutive_skips", 10_000))
    seconds = data.get("max_skip_seconds", 300)
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0
    ):
        _fail("data.max_skip_seconds", f"expected a positive number of seconds or null, got {seconds!r}")
    _check_pose_head(task, backbone)

    # trainer: keys must be lightning.Trainer arguments
    trainer = dict(resolved["trainer"])
    trainer.pop("strategy", None)  # a string or a _target_ dict, checked by Lightning itself
    check_kwargs("trainer", trainer, L.Trainer.__init__)
    for key in ("max_steps",):
        if not isinstance(trainer.get(key), int):
            _fail(f"trainer.{key}", f"expected an integer, got {trainer.get(key)!r}")


def _check_pose_head(task: dict, backbone: dict) -> None:
    """Pose heatmaps must come out of the head at the size of the targets (input / heatmap_stride):
    the head upsamples the patch grid x2 per deconvolution, so e.g. patch 8 with the published two
    deconvolutions gives heatmaps twice too large, which would only fail inside the first loss."""
    if task.get("reader") != "pose":
        return
    height, width = task["image_size"]
    patch, padding = backbone["patch_size"], int(task.get("patch_padding") or 0)
    deconvs = len((task.get("task_head") or {}).get("deconv_channels") or [])
    stride = int((task.get("train_transform") or {}).get("heatmap_stride", 4))
    grid = [(side + 2 * padding - patch) // patch + 1 for side in (height, width)]
    produced = [g * 2**deconvs for g in grid]
    expected = [height // stride, width // stride]
    if produced != expected:
        needed = patch * produced[0] / expected[0]
        hint = f"patch_size {needed:g}" if needed.is_integer() else "another patch size"
        _fail(
            "model.backbone.patch_size",
            f"{patch} makes the pose head produce {produced[0]}x{produced[1]} heatmaps ({grid[0]}x{grid[1]} "
            f"patches, x2 per entry of task.task_head.deconv_channels ({deconvs})) but the targets of "
            f"{height}x{width} images are {expected[0]}x{expected[1]} (stride {stride}); use {hint}, or "
            f"{math.log2(expected[0] / grid[0]):g} deconvolutions",
        )
