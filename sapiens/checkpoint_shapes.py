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
from sapiens.checkpoints.keys import num_blocks
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


# Sapiens2 has no position table to read the input size from; its published task models all take 1024 x 768.
SAPIENS2_PUBLISHED_GRID = (64, 48)


def _sapiens2_shape(state: dict[str, torch.Tensor]) -> tuple[dict, tuple[int, int] | None] | None:
    """Sapiens2 (our key names): the whole architecture is in the shapes. Heads from the per-head q-norm
    width, KV heads and the plain-attention blocks at both ends from the k projections, registers from
    their table, the 4K tokenizer from its blocks; the grid is the published 64 x 48 (no position table)."""
    wq, q_norm = state.get("blocks.0.attn.wq.weight"), state.get("blocks.0.attn.q_norm.weight")
    proj = state.get("patch_embed.proj.weight")
    if wq is None or q_norm is None or proj is None:
        return None
    dim, head_dim = int(wq.shape[0]), int(q_norm.shape[0])
    depth = num_blocks(state)
    kv_rows = [int(state[f"blocks.{i}.attn.wk.weight"].shape[0]) for i in range(depth)]
    grouped = [i for i, rows in enumerate(kv_rows) if rows != dim]
    tokenizer_depth = num_blocks(state, "tokenizer.blocks.")
    spec = {
        "family": "sapiens2",
        "embed_dim": dim,
        "depth": depth,
        "num_heads": dim // head_dim,
        "num_kv_heads": (kv_rows[grouped[0]] if grouped else dim) // head_dim,
        "mhsa_early": grouped[0] if grouped else depth,
        "mhsa_late": depth - 1 - grouped[-1] if grouped else 0,
        "patch_size": int(proj.shape[-1]),
        "patch_padding": 0,
        "mlp_ratio": int(state["blocks.0.ffn.w3.weight"].shape[1]) / dim,
        "num_register_tokens": int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
        "use_tokenizer": tokenizer_depth > 0,
    }
    if tokenizer_depth:
        spec["tokenizer_depth"] = tokenizer_depth
    return spec, SAPIENS2_PUBLISHED_GRID


# family -> reader(backbone state with our key names) -> (shape dict, grid) or None; a reader that cannot
# see the number of heads leaves ``num_heads`` out (a conf/model size or 64-wide heads fill it in).
BACKBONE_SHAPE_READERS: dict[str, Callable[[dict], tuple[dict, tuple[int, int] | None] | None]] = {
    "vit": _vit_shape,
    "sapiens2": _sapiens2_shape,
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
    if "num_heads" in shape:
        return shape, grid, size["name"] if size else None
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


# Sapiens2 head classes a spec may name (``spec.head["head"]["class"]``); nothing else is built from a file.
SAPIENS2_HEADS = {"pose": "PoseHeatmapHead", "normal": "NormalHead", "pointmap": "PointmapHead"}


def head_from_state(path: str | Path, head: Mapping[str, torch.Tensor]) -> tuple[str, dict, int]:
    """(task, head kwargs without label space, output count) from the head tensors.

    Sapiens heads end in ``final_layer`` (pose, K heatmaps) or ``conv_seg`` with 1 (depth), 3 (normals) or
    N (part classes) outputs, and are rebuilt from ``deconv_channels`` / ``conv_channels``. Sapiens2 heads
    (``conv_pose``, ``conv_normal``, ``conv_pointmap``) are named with their widths under ``head``
    (``{"class": "PoseHeatmapHead", ...}``); the Sapiens2 seg head is the Sapiens one with other widths.
    A pointmap head's scale strides depend on the input size: :func:`pointmap_scale_strides`.
    """
    from sapiens.models.heads_sapiens2 import identify_head

    info = identify_head(dict(head))
    task, outputs = info["task"], info["outputs"]
    if task is None:
        raise ModelSpecError(
            f"{path}: the head tensors ({', '.join(sorted(head)[:3])}...) are not a pose or dense head"
        )
    widths = {"deconv_channels": info["deconv_channels"], "conv_channels": info["conv_channels"]}
    if info["layout"] == "sapiens":
        return task, widths, outputs
    layout: dict = {"class": SAPIENS2_HEADS[task]}
    if task == "pose":
        layout.update(widths)
    else:  # the pixel-shuffle trunk of the normal and pointmap heads
        layout.update(upsample_channels=info["upsample_channels"], conv_channels=info["conv_channels"])
    if task == "pointmap":
        layout["scale_channels"] = [int(head[k].shape[0]) for k in _indexed(head, "scale_conv_layers")]
    return task, {"head": layout}, outputs


def _indexed(head: Mapping[str, torch.Tensor], group: str) -> list[str]:
    """The conv weights ``<group>.<i>.weight`` in index order."""
    found = [(int(m.group(1)), k) for k in head if (m := re.fullmatch(rf"{group}\.(\d+)\.weight", k))]
    return [k for _, k in sorted(found) if head[k].ndim == 4]


def pointmap_scale_strides(path, head: Mapping[str, torch.Tensor], image_size: tuple[int, int]) -> list[int]:
    """Strides of a pointmap head's scale convs: the published (2, 2, 2), or as many leading halvings as
    make the first Linear of ``scale_final_layer`` fit the grid of ``image_size`` (small inputs halve
    fewer times). One-line error when none fits."""
    from sapiens.models.heads import BACKBONE_STRIDE
    from sapiens.models.heads_sapiens2 import scale_grid

    convs = _indexed(head, "scale_conv_layers")
    channels, features = int(head[convs[-1]].shape[0]), int(head["scale_final_layer.1.weight"].shape[1])
    grid = [s // BACKBONE_STRIDE for s in image_size]
    for halvings in range(len(convs), -1, -1):
        strides = [2] * halvings + [1] * (len(convs) - halvings)
        h, w = scale_grid(grid, strides)
        if channels * h * w == features:
            return strides
    raise ModelSpecError(
        f"{path}: the pointmap scale branch ({features} features) fits no stride pattern at input "
        f"{image_size[0]}x{image_size[1]}; pass image_size=[H,W]"
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
