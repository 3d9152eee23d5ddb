"""What the tensors of a checkpoint say about its model: backbone shape, task head, label-space size.

Used for files that carry no description (published fine-tuned ``.pth`` files): see
:mod:`sapiens.model_spec`. Everything family-specific sits in :data:`BACKBONE_SHAPE_READERS`, one reader
per backbone family (next to the family's key tables in ``sapiens.checkpoints``); a new family adds its
reader there. Readers see the backbone tensors under our key names (``extract_backbone_state``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from sapiens.checkpoints import HEAD_PREFIXES, extract_backbone_state
from sapiens.labels import available_label_spaces, load_class_list, load_keypoint_set
from sapiens.models.pos_embed import infer_grid

log = logging.getLogger(__name__)

# Published fine-tuning crops are 1024 x 768 (H x W): the grid of a flat position table has that aspect.
PUBLISHED_GRID_ASPECT = (4, 3)
CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


class ModelSpecError(ValueError):
    """A checkpoint that does not describe the model that was asked for (one line, naming the file)."""


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
