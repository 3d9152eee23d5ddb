"""What a fine-tuned model is, read from the file that holds it: task, backbone, input size, head, labels.

Inference, evaluation and export need no hand-set value: a :class:`ModelSpec` is read from
- ``sapiens_model`` in our Lightning checkpoints (written by ``FinetuneModule.on_save_checkpoint``):
  everything, label space included;
- ``hyper_parameters`` of older Lightning checkpoints and of ZeRO-converted files (backbone, input size,
  patch padding), plus the run directory's ``config.yaml`` (task, label space) when the file sits in one;
- tensor shapes for published fine-tuned ``.pth`` files: the backbone family's shape reader gives width,
  depth and the position grid (-> input size), the width and depth a model size of ``conf/model``
  (-> number of heads), the head tensors the task, the keypoint or class count and the head widths;
  the published recipes give the patch padding per task (reference sapiens.md section 3).

Everything family-specific sits in :data:`BACKBONE_SHAPE_READERS` (one entry per backbone family, next
to the family's key tables in ``sapiens.checkpoints``); a new family adds its reader there.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sapiens.checkpoints import HEAD_PREFIXES, extract_backbone_state
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD
from sapiens.labels import (
    ClassList,
    KeypointSet,
    available_label_spaces,
    load_class_list,
    load_keypoint_set,
)
from sapiens.models.pos_embed import infer_grid

log = logging.getLogger(__name__)

TASKS = ("pose", "seg", "depth", "normal")
# Patch-embed padding of the published fine-tuning recipes (sapiens.md section 1: padding=2 in every pose
# and normal config, none in Goliath seg and depth), used when the file does not say.
PUBLISHED_PATCH_PADDING = {"pose": 2, "seg": 0, "depth": 0, "normal": 2}
# Published fine-tuning crops are 1024 x 768 (H x W): the grid of a flat position table has that aspect.
PUBLISHED_GRID_ASPECT = (4, 3)
CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


class ModelSpecError(ValueError):
    """A checkpoint that does not describe the model that was asked for (one line, naming the file)."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a fine-tuned model and to run it on images.

    Attributes:
        task: ``pose``, ``seg``, ``depth`` or ``normal``.
        backbone: ``model.backbone``: family and shape (what ``models.factory.build_backbone`` takes).
        image_size: (H, W) network input.
        patch_padding: patch-embed conv padding.
        head: keyword arguments of the task class that fix the head and its decoding (label space as a
            mapping, head widths, heatmap sigma).
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
        from sapiens.tasks.depth import DepthTask
        from sapiens.tasks.normal import NormalTask
        from sapiens.tasks.pose import PoseTask
        from sapiens.tasks.segmentation import SegmentationTask

        classes = {"pose": PoseTask, "seg": SegmentationTask, "depth": DepthTask, "normal": NormalTask}
        if self.task != "pose":
            runtime.pop("flip_test", None)  # the flip test is pose's
        kwargs = {**self.head, **runtime}
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


# ---------------------------------------------------------------------- backbone shapes by family
def _vit_shape(state: dict[str, torch.Tensor]) -> tuple[dict, tuple[int, int] | None] | None:
    """Sapiens ViT (our key names): shape dict and the patch grid of its position table."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or "blocks.0.attn.qkv.weight" not in state:
        return None
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    spec = {
        "family": "vit",
        "embed_dim": dim,
        "depth": depth,
        "patch_size": patch,
        "mlp_ratio": hidden / dim,
    }
    if "blocks.0.attn.qkv.bias" not in state:
        spec["qkv_bias"] = False
    grid = None
    table = state.get("pos_embed")
    if table is not None and table.ndim == 3:
        tokens = int(table.shape[1])
        if "cls_token" in state:
            tokens -= 1
        grid = infer_grid(tokens, PUBLISHED_GRID_ASPECT)
    return spec, grid


# family -> reader(backbone state with our key names) -> (shape dict without num_heads, grid) or None.
BACKBONE_SHAPE_READERS: dict[str, Callable[[dict], tuple[dict, tuple[int, int] | None] | None]] = {
    "vit": _vit_shape,
}


@functools.lru_cache(maxsize=1)
def known_model_sizes() -> list[dict]:
    """``conf/model/*.yaml`` as ``{"name", "backbone"}`` dicts (what a width and depth are matched to)."""
    sizes = []
    for path in sorted(CONF_MODEL_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("backbone"), dict):
            sizes.append({"name": data.get("name", path.stem), "backbone": data["backbone"]})
    return sizes


def match_model_size(shape: dict) -> dict | None:
    """The ``conf/model`` entry of the same family, width and depth as ``shape``, or None."""
    for size in known_model_sizes():
        bb = size["backbone"]
        if (
            bb.get("family", "vit") == shape["family"]
            and bb.get("embed_dim") == shape["embed_dim"]
            and bb.get("depth") == shape["depth"]
        ):
            return size
    return None


def backbone_from_state(
    path: str | Path, state: dict[str, torch.Tensor]
) -> tuple[dict, tuple | None, str | None]:
    """(``model.backbone`` dict, patch grid or None, model name or None) from the tensors of a file."""
    backbone = extract_backbone_state(state)
    for reader in BACKBONE_SHAPE_READERS.values():
        found = reader(backbone)
        if found is not None:
            shape, grid = found
            break
    else:
        raise ModelSpecError(
            f"{path}: no backbone of a known family ({', '.join(BACKBONE_SHAPE_READERS)}) in it"
        )
    size = match_model_size(shape)
    if size is not None:
        shape["num_heads"] = size["backbone"]["num_heads"]
        return shape, grid, size["name"]
    if shape["embed_dim"] % 64:
        raise ModelSpecError(
            f"{path}: backbone width {shape['embed_dim']} and depth {shape['depth']} match no "
            "conf/model size; pass num_heads=..."
        )
    shape["num_heads"] = shape["embed_dim"] // 64  # the head width of most published sizes
    log.warning(
        "%s: width %d matches no conf/model size; assuming %d heads",
        path,
        shape["embed_dim"],
        shape["num_heads"],
    )
    return shape, grid, None


# ---------------------------------------------------------------------- heads
def head_state(state: Mapping[str, torch.Tensor]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(prefix, tensors) of the task head in a checkpoint (``task.head.``, ``decode_head.``, ``head.``)."""
    for prefix in HEAD_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return prefix, sub
    return None, {}


def _layer_channels(head: Mapping[str, torch.Tensor], group: str, axis: int) -> list[int]:
    keys = sorted((int(m.group(1)), k) for k in head if (m := re.fullmatch(rf"{group}\.(\d+)\.weight", k)))
    return [int(head[k].shape[axis]) for _, k in keys]


def head_from_state(path: str | Path, head: Mapping[str, torch.Tensor]) -> tuple[str, dict, int]:
    """(task, head kwargs without label space, output count) from the head tensors.

    Pose heads end in ``final_layer`` (K heatmaps); dense heads in ``conv_seg`` with 1 (depth), 3 (normals)
    or N (part classes) outputs.
    """
    deconv = _layer_channels(head, "deconv_layers", 1)  # ConvTranspose2d weight: (in, out, k, k)
    conv = _layer_channels(head, "conv_layers", 0)
    if "final_layer.weight" in head:
        return (
            "pose",
            {"deconv_channels": deconv, "conv_channels": conv},
            int(head["final_layer.weight"].shape[0]),
        )
    if "conv_seg.weight" in head:
        out = int(head["conv_seg.weight"].shape[0])
        task = {1: "depth", 3: "normal"}.get(out, "seg")
        return task, {"deconv_channels": deconv, "conv_channels": conv}, out
    raise ModelSpecError(
        f"{path}: the head tensors ({', '.join(sorted(head)[:3])}...) are not a pose or dense head"
    )


@functools.lru_cache(maxsize=1)
def _builtin_label_counts() -> dict[tuple[str, int], str]:
    """(kind, size) -> built-in label space, e.g. ("pose", 17) -> coco17, ("seg", 28) -> goliath_parts28."""
    out = {}
    for name in available_label_spaces():
        try:
            out.setdefault(("pose", load_keypoint_set(name).num_keypoints), name)
        except (ValueError, FileNotFoundError):
            out.setdefault(("seg", load_class_list(name).num_classes), name)
    return out


def default_label_space(path: str | Path, task: str, count: int) -> str:
    """The built-in keypoint set or class list with ``count`` entries (one-line error when none)."""
    name = _builtin_label_counts().get((task, count))
    if name is None:
        what, key = ("keypoints", "keypoint_set") if task == "pose" else ("classes", "class_list")
        raise ModelSpecError(
            f"{path}: its head predicts {count} {what} and no built-in label space has {count}; "
            f"pass {key}=path/to/labels.yaml"
        )
    return name


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
            f"{path} holds no task head (a pretraining checkpoint?); a fine-tuned pose, seg, depth or normal "
            "model is needed"
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
    if hparams.get("image_size"):
        image_size = tuple(hparams["image_size"])
    elif grid is not None:
        image_size = (grid[0] * patch, grid[1] * patch)
    else:
        raise ModelSpecError(f"{path}: no position table to read the input size from; pass image_size=[H,W]")
    padding = hparams.get("patch_padding", PUBLISHED_PATCH_PADDING[task])
    head = dict(head_kwargs)
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
