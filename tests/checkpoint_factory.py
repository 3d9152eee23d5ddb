"""Tiny fine-tuned models of every task, saved in each layout inference accepts.

- ours: what Lightning writes (``state_dict``, ``hyper_parameters``, ``sapiens_model``);
- published: the mmengine layout of the released Sapiens ``.pth`` files (sapiens.md section 5):
  ``{"state_dict": {"backbone.<mmpretrain keys>", "head.*" (pose) | "decode_head.*"}, "meta": {}}``;
- ZeRO-converted: what ``python -m sapiens.zero_to_fp32`` writes for a run whose checkpoints predate
  the ``sapiens_model`` entry (``state_dict`` with the module's names, ``hyper_parameters``,
  ``zero_conversion``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from sapiens.checkpoints import OURS_TO_PUBLISHED, rename_keys
from sapiens.lit.finetune import FinetuneModule
from sapiens.tasks.depth import DepthTask
from sapiens.tasks.normal import NormalTask
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
