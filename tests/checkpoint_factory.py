"""Tiny fine-tuned models of every task, saved in each layout inference accepts.

- ours: what Lightning writes (``state_dict``, ``hyper_parameters``, ``sapiens_model``);
- published: the mmengine layout of the released Sapiens ``.pth`` files (sapiens.md section 5):
  ``{"state_dict": {"backbone.<mmpretrain keys>", "head.*" (pose) | "decode_head.*"}, "meta": {}}``;
- ZeRO-converted: what ``python -m sapiens.zero_to_fp32`` writes for a run whose checkpoints predate
  the ``sapiens_model`` entry (``state_dict`` with the module's names, ``hyper_parameters``,
  ``zero_conversion``);
- Sapiens2 published task files (sapiens2.md section 1): ``backbone.<published Sapiens2 keys>`` +
  ``decode_head.*`` as ``.safetensors`` or a ``.pth`` holding ``state_dict``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from sapiens.checkpoints import OURS_TO_PUBLISHED, rename_keys, to_published_layout, write_safetensors
from sapiens.lit.finetune import FinetuneModule
from sapiens.models.heads import DenseHead
from sapiens.models.heads_sapiens2 import NormalHead, PointmapHead, PoseHeatmapHead
from sapiens.tasks.depth import DepthTask
from sapiens.tasks.normal import NormalTask
from sapiens.tasks.pointmap import PointmapTask
from sapiens.tasks.pose import PoseTask
from sapiens.tasks.segmentation import SegmentationTask

TASKS = ("pose", "seg", "depth", "normal")
BACKBONE = {"family": "vit", "embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16, "mlp_ratio": 4.0}
SIZE = (64, 48)
HEADS = {
    "pose": partial(
        PoseTask, keypoint_set="coco17", deconv_channels=(32, 32), conv_channels=(32, 32), sigma=1.5
    ),
    "seg": partial(SegmentationTask, deconv_channels=(32,) * 3, conv_channels=(32,) * 3),
    "depth": partial(DepthTask, deconv_channels=(16,) * 4, conv_channels=(16, 16)),
    "normal": partial(NormalTask, deconv_channels=(32,) * 3, conv_channels=(32,) * 3),
}
# Published recipes (what a published file is read with): padding 2 for pose and normals.
PADDING = {"pose": 2, "seg": 0, "depth": 0, "normal": 2}
# The Hydra overrides that make train.py build exactly these models.
HEAD_OVERRIDES = {
    "pose": ["task.task_head.deconv_channels=[32,32]", "task.task_head.conv_channels=[32,32]"],
    "seg": ["task.task_head.deconv_channels=[32,32,32]", "task.task_head.conv_channels=[32,32,32]"],
    "depth": ["task.task_head.deconv_channels=[16,16,16,16]", "task.task_head.conv_channels=[16,16]"],
    "normal": ["task.task_head.deconv_channels=[32,32,32]", "task.task_head.conv_channels=[32,32,32]"],
}


def make_module(task: str, seed: int = 0) -> FinetuneModule:
    """A tiny fine-tuning module of ``task`` with random (seeded) weights, in eval mode.

    The head's last layer is re-drawn at a normal scale: the published init (std 0.001) would make
    every output nearly constant, and the tests compare outputs."""
    torch.manual_seed(seed)
    module = FinetuneModule(BACKBONE, HEADS[task], image_size=SIZE, patch_padding=PADDING[task])
    for param in module.task.head.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return module.eval()


def save_ours(module: FinetuneModule, path: Path) -> Path:
    """A Lightning-style checkpoint with the ``sapiens_model`` entry."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "global_step": 1,
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def published_state(module: FinetuneModule) -> dict[str, torch.Tensor]:
    """The module's weights under the published (mmengine) key names."""
    backbone = rename_keys(module.backbone.state_dict(), OURS_TO_PUBLISHED)
    head = "head." if module.task.name == "pose" else "decode_head."
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({f"{head}{k}": v for k, v in module.task.head.state_dict().items()})
    return state


def save_published(module: FinetuneModule, path: Path) -> Path:
    """The released ``.pth`` layout: no hyper-parameters, no label names, published key names."""
    torch.save({"state_dict": published_state(module), "meta": {"mmengine_version": "0.10.4"}}, path)
    return path


def save_zero_converted(module: FinetuneModule, path: Path) -> Path:
    """The layout of ``sapiens.zero_to_fp32`` output for a checkpoint without ``sapiens_model``."""
    checkpoint = {
        "state_dict": {k: v.float() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "epoch": 0,
        "global_step": 1,
        "zero_conversion": {"source": "runs/x/checkpoints/last.ckpt", "tag": "checkpoint", "stage": 2},
    }
    torch.save(checkpoint, path)
    return path


# ---------------------------------------------------------------------- Sapiens2
SAPIENS2_TASKS = ("pose", "seg", "normal", "pointmap")
# sapiens2_tiny's shape (conf/model/sapiens2_tiny.yaml): GQA in the two middle blocks.
SAPIENS2_BACKBONE = {
    "family": "sapiens2",
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mhsa_early": 1,
    "mhsa_late": 1,
    "patch_size": 16,
    "patch_padding": 0,
    "num_register_tokens": 8,
}
SAPIENS2_SIZE = (64, 48)
SAPIENS2_HEADS = {
    "pose": partial(
        PoseTask,
        keypoint_set="goliath308",
        sigma=1.5,
        head=partial(PoseHeatmapHead, deconv_channels=(16, 16), conv_channels=(8, 8, 8)),
    ),
    "seg": partial(
        SegmentationTask,
        class_list="sapiens2_parts29",
        class_weight="sapiens2",
        head=partial(DenseHead, deconv_channels=(8, 8, 8, 8), conv_channels=(8, 8), dropout=0.0),
    ),
    "normal": partial(
        NormalTask, head=partial(NormalHead, upsample_channels=(8, 8, 8, 8), conv_channels=(8, 8, 4))
    ),
    "pointmap": partial(
        PointmapTask,
        canonical_focal=48.0,
        head=partial(
            PointmapHead,
            upsample_channels=(8, 8, 8, 8),
            conv_channels=(8, 8, 4),
            scale_channels=(16, 8, 8),
            scale_strides=(2, 1, 1),
        ),
    ),
}


def make_sapiens2_module(task: str, seed: int = 0) -> FinetuneModule:
    """A tiny Sapiens2 fine-tuning module of ``task`` (sapiens2_tiny, 64x48, slim published-layout heads)
    with random (seeded) weights at a normal scale (see :func:`make_module`), in eval mode."""
    torch.manual_seed(seed)
    module = FinetuneModule(SAPIENS2_BACKBONE, SAPIENS2_HEADS[task], image_size=SAPIENS2_SIZE)
    for name, param in module.named_parameters():
        if name.startswith("task.head.") or name.endswith("gamma.weight"):
            torch.nn.init.normal_(param, std=0.3)  # layer scale too: 1e-4 would hide the attention
    return module.eval()


def sapiens2_published_state(module: FinetuneModule) -> dict[str, torch.Tensor]:
    """The module's weights as a released Sapiens2 task file names them."""
    backbone = to_published_layout(module.backbone.state_dict(), "sapiens2")
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({f"decode_head.{k}": v for k, v in module.task.head.state_dict().items()})
    return state


def save_sapiens2_published(module: FinetuneModule, path: Path) -> Path:
    """A released Sapiens2 task file: ``.safetensors`` (flat) or a ``.pth`` holding ``state_dict``."""
    state = sapiens2_published_state(module)
    if Path(path).suffix == ".safetensors":
        return write_safetensors(state, path)
    torch.save({"state_dict": state}, path)
    return path
