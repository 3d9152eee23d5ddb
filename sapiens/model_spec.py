"""What a fine-tuned model is, read from the file that holds it: task, backbone, input size, head, labels.

Inference, evaluation and export need no hand-set value: a :class:`ModelSpec` is read from
- ``sapiens_model`` in our Lightning checkpoints (written by ``FinetuneModule.on_save_checkpoint``):
  everything, label space included;
- ``hyper_parameters`` of older Lightning checkpoints and of ZeRO-converted files (backbone, input size,
  patch padding), plus the run directory's ``config.yaml`` (task, label space) when the file sits in one;
- tensor shapes for published fine-tuned files (Sapiens ``.pth``, Sapiens2 ``.safetensors`` / ``.pth``):
  the backbone family's shape reader gives width, depth and the position grid (-> input size; Sapiens2 has
  none: its published 1024 x 768), the width and depth a model size of ``conf/model`` (-> number of heads,
  where the shapes do not tell it), the head tensors the task, the keypoint or class count and the head
  widths (Sapiens2 heads by class name); the published recipes give the patch padding per task (reference
  sapiens.md section 3).

The tensor-shape readers (the only family-specific part) are in :mod:`sapiens.checkpoint_shapes`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sapiens.checkpoint_shapes import (
    SAPIENS2_HEADS,
    ModelSpecError,
    backbone_from_state,
    default_label_space,
    head_from_state,
    head_state,
    match_model_size,
    pointmap_scale_strides,
)
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD
from sapiens.labels import ClassList, KeypointSet, load_class_list, load_keypoint_set

log = logging.getLogger(__name__)

TASKS = ("pose", "seg", "depth", "normal", "pointmap")
# Patch-embed padding of the published fine-tuning recipes (sapiens.md section 1: padding=2 in every pose
# and normal config, none in Goliath seg and depth), used when the file does not say. Sapiens2 backbones
# fix their own (0) in the backbone dict.
PUBLISHED_PATCH_PADDING = {"pose": 2, "seg": 0, "depth": 0, "normal": 2, "pointmap": 0}

__all__ = ["TASKS", "ModelSpec", "ModelSpecError", "head_state", "read_model_spec", "spec_of_module"]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a fine-tuned model and to run it on images.

    Attributes:
        task: ``pose``, ``seg``, ``depth``, ``normal`` or ``pointmap``.
        backbone: ``model.backbone``: family and shape (what ``models.factory.build_backbone`` takes).
        image_size: (H, W) network input.
        patch_padding: patch-embed conv padding.
        head: keyword arguments of the task class that fix the head and its decoding (label space as a
            mapping, head widths, heatmap sigma); a Sapiens2 head as ``head: {"class": <name in
            sapiens.models.heads_sapiens2>, widths...}``.
        model_name: the ``conf/model`` size it matches (e.g. ``sapiens_0.3b``), or None.
        mean, std: RGB normalisation of the input (0..255 scale).
        source: how the spec was read (for logs and ``meta.json``).
    """

    task: str
    backbone: dict
    image_size: tuple[int, int]
    patch_padding: int
    head: dict = field(default_factory=dict)
    model_name: str | None = None
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD
    source: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ModelSpecError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    # ------------------------------------------------------------------ labels
    @property
    def keypoint_set(self) -> KeypointSet | None:
        """The pose label space (None for the dense tasks)."""
        return load_keypoint_set(self.head["keypoint_set"]) if self.task == "pose" else None

    @property
    def class_list(self) -> ClassList | None:
        """The segmentation classes (None for the other tasks)."""
        return load_class_list(self.head["class_list"]) if self.task == "seg" else None

    def label_names(self) -> list[str]:
        """Keypoint or class names; empty for depth and normals."""
        labels = self.keypoint_set or self.class_list
        return list(labels.names) if labels is not None else []

    # ------------------------------------------------------------------ building
    def build_task(self, in_channels: int, **runtime):
        """The task module (head + decoding) of this spec; ``runtime``: e.g. ``flip_test=False``."""
        from sapiens.models import heads_sapiens2
        from sapiens.tasks.depth import DepthTask
        from sapiens.tasks.normal import NormalTask
        from sapiens.tasks.pointmap import PointmapTask
        from sapiens.tasks.pose import PoseTask
        from sapiens.tasks.segmentation import SegmentationTask

        classes = {
            "pose": PoseTask,
            "seg": SegmentationTask,
            "depth": DepthTask,
            "normal": NormalTask,
            "pointmap": PointmapTask,
        }
        if self.task != "pose":
            runtime.pop("flip_test", None)  # the flip test is pose's
        kwargs = {**self.head, **runtime}
        if isinstance(kwargs.get("head"), Mapping):  # a Sapiens2 head by class name, never an arbitrary path
            layout = dict(kwargs["head"])
            name = layout.pop("class", None)
            if name not in SAPIENS2_HEADS.values():
                raise ModelSpecError(
                    f"unknown head class {name!r}; expected one of {sorted(SAPIENS2_HEADS.values())}"
                )
            kwargs["head"] = functools.partial(getattr(heads_sapiens2, name), **layout)
        if self.task == "seg":
            kwargs.setdefault("class_weight", None)  # a loss setting; inference needs none
        return classes[self.task](in_channels=in_channels, image_size=self.image_size, **kwargs)

    def summary(self) -> str:
        """One line for logs: task, labels, model, input."""
        labels = self.keypoint_set or self.class_list
        what = self.task
        if labels is not None:
            what += (
                f" ({labels.name}, {len(labels.names)} {'keypoints' if self.task == 'pose' else 'classes'})"
            )
        size = self.model_name or f"{self.backbone.get('family', 'vit')} {self.backbone.get('embed_dim')}w"
        h, w = self.image_size
        return f"{what}, {size}, input {h}x{w}, patch padding {self.patch_padding} [{self.source}]"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (stored in checkpoints and exported models)."""
        out = asdict(self)
        out["image_size"], out["mean"], out["std"] = list(self.image_size), list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> ModelSpec:
        """Inverse of :meth:`to_dict`."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        if source is not None:
            spec.source = source
        return spec


def _run_config(path: str | Path) -> dict | None:
    """The resolved ``config.yaml`` of the run a checkpoint sits in (``<run>/checkpoints/x.ckpt``)."""
    for folder in list(Path(path).resolve().parents)[:2]:
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text())
            except yaml.YAMLError:
                return None
            return data if isinstance(data, dict) else None
    return None


# ---------------------------------------------------------------------- the whole spec
def read_model_spec(
    path: str | Path,
    checkpoint: Any,
    state: dict[str, torch.Tensor],
    task: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """The :class:`ModelSpec` of a checkpoint (see the module docstring for the sources, in order).

    Args:
        path: the file (for messages and the run directory's ``config.yaml``).
        checkpoint: the loaded file object (``load_checkpoint_file``).
        state: its tensors (``state_dict`` or the flat dict).
        task: the task asked for; a file holding another task is a :class:`ModelSpecError`.
        overrides: ``keypoint_set``, ``class_list``, ``patch_padding``, ``image_size``, ``num_heads`` for
            files that do not say (published files with custom labels or recipes).

    Raises:
        ModelSpecError: unknown task, no head, a head of another task, a label space that does not fit.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if task is not None and task not in TASKS:
        raise ModelSpecError(f"task={task!r} is not a task; expected one of {', '.join(TASKS)} ({path})")
    extras = checkpoint if isinstance(checkpoint, dict) else {}
    prefix, head = head_state(state)
    if not head:
        raise ModelSpecError(
            f"{path} holds no task head (a pretraining checkpoint?); a fine-tuned pose, seg, depth, normal "
            "or pointmap model is needed"
        )
    found, head_kwargs, outputs = head_from_state(path, head)
    if task == "seg" and found == "normal":  # a 3-class segmentation head looks like a normal head
        found = "seg"
    embedded = extras.get("sapiens_model")
    if isinstance(embedded, Mapping):
        spec = ModelSpec.from_dict(embedded, source="checkpoint metadata")
    else:
        spec = _spec_from_shapes(path, extras, state, found, head_kwargs, outputs, overrides)
    if task is not None and spec.task != task:
        raise ModelSpecError(
            f"{path} holds a {spec.task} model ({prefix}* with {outputs} outputs), not a {task} model"
        )
    _apply_label_overrides(path, spec, outputs, overrides)
    if "patch_padding" in overrides:
        spec.patch_padding = int(overrides["patch_padding"])
    if "image_size" in overrides:
        spec.image_size = tuple(int(v) for v in overrides["image_size"])
    if "num_heads" in overrides:
        spec.backbone["num_heads"] = int(overrides["num_heads"])
    return spec


def _spec_from_shapes(path, extras, state, task, head_kwargs, outputs, overrides) -> ModelSpec:
    """Spec of a file without embedded metadata: hyper_parameters, the run's config.yaml, tensor shapes."""
    backbone, grid, model_name = backbone_from_state(path, state)
    patch = backbone["patch_size"]
    hparams = extras.get("hyper_parameters") if isinstance(extras.get("hyper_parameters"), Mapping) else {}
    config = _run_config(path) if hparams else None
    task_cfg = (config or {}).get("task") or {}
    head_cfg = task_cfg.get("task_head") or {}
    if task_cfg.get("name") in TASKS:
        task = task_cfg["name"]
    if isinstance(hparams.get("backbone"), Mapping):
        backbone = {**backbone, **hparams["backbone"]}
    if overrides.get("image_size"):
        image_size = tuple(int(v) for v in overrides["image_size"])
    elif hparams.get("image_size"):
        image_size = tuple(hparams["image_size"])
    elif grid is not None:
        image_size = (grid[0] * patch, grid[1] * patch)
    else:
        raise ModelSpecError(f"{path}: no position table to read the input size from; pass image_size=[H,W]")
    padding = hparams.get("patch_padding", backbone.get("patch_padding", PUBLISHED_PATCH_PADDING[task]))
    head = dict(head_kwargs)
    if task == "pointmap":
        head["head"]["scale_strides"] = pointmap_scale_strides(path, head_state(state)[1], image_size)
    if task == "pose":
        head["sigma"] = float(head_cfg.get("sigma", 6.0 * image_size[0] / 1024))  # published: 6 at 1024 x 768
        head["keypoint_set"] = _label_data(path, "pose", head_cfg.get("keypoint_set"), outputs, overrides)
    elif task == "seg":
        head["class_list"] = _label_data(path, "seg", head_cfg.get("class_list"), outputs, overrides)
    source = "hyper_parameters + tensor shapes" if hparams else "tensor shapes (published layout)"
    if config is not None:
        source = "hyper_parameters + run config.yaml"
    return ModelSpec(task, backbone, image_size, int(padding), head, model_name, source=source)


def _label_data(path, task: str, configured: Any, count: int, overrides: Mapping) -> dict:
    """Label space as a mapping: an override, the run's configured one when it loads, else the built-in one
    with ``count`` entries."""
    key = "keypoint_set" if task == "pose" else "class_list"
    loader = load_keypoint_set if task == "pose" else load_class_list
    for candidate in (overrides.get(key), configured):
        if candidate is None:
            continue
        try:
            return loader(candidate).to_dict()
        except (FileNotFoundError, ValueError) as err:
            if candidate is overrides.get(key):
                raise ModelSpecError(f"{key}={candidate}: {err}") from None
            log.warning(
                "%s: the run's %s %r does not load (%s); using the built-in one", path, key, candidate, err
            )
    return loader(default_label_space(path, task, count)).to_dict()


def _apply_label_overrides(path, spec: ModelSpec, outputs: int, overrides: Mapping) -> None:
    """Replace the label space when asked, and check its size against the head."""
    key = {"pose": "keypoint_set", "seg": "class_list"}.get(spec.task)
    if key is None:
        return
    if key in overrides:
        loader = load_keypoint_set if spec.task == "pose" else load_class_list
        try:
            spec.head[key] = loader(overrides[key]).to_dict()
        except (FileNotFoundError, ValueError) as err:
            raise ModelSpecError(f"{key}={overrides[key]}: {err}") from None
    size = len(spec.head[key]["names"])
    if size != outputs:
        raise ModelSpecError(
            f"{path}: the head predicts {outputs} {'keypoints' if spec.task == 'pose' else 'classes'} but "
            f"{key} '{spec.head[key].get('name')}' has {size}"
        )


def spec_of_module(module) -> ModelSpec:
    """The spec of a live ``FinetuneModule`` (what its checkpoints carry as ``sapiens_model``)."""
    hp = module.hparams
    task = module.task
    _, head_kwargs, _ = head_from_state("<module>", task.head.state_dict())
    head = dict(head_kwargs)
    if task.name == "pose":
        head["keypoint_set"] = task.kset.to_dict()
        head["sigma"] = float(task.codec.sigma)
    elif task.name == "seg":
        head["class_list"] = task.classes.to_dict()
    elif task.name == "pointmap":
        strides = pointmap_scale_strides("<module>", task.head.state_dict(), tuple(hp["image_size"]))
        head["head"]["scale_strides"] = strides
    backbone = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(hp["backbone"]).items()}
    size = match_model_size({"family": backbone.get("family", "vit"), **backbone})
    return ModelSpec(
        task=task.name,
        backbone=backbone,
        image_size=tuple(hp["image_size"]),
        patch_padding=int(hp["patch_padding"]),
        head=head,
        model_name=size["name"] if size else None,
        source="checkpoint metadata",
    )
