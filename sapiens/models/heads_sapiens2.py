"""Sapiens2 task heads (reference sapiens2.md section 2), with the published parameter names.

Every head takes the backbone feature map (B, C, H/16, W/16); ``InstanceNorm2d`` has no affine parameters, so
block weights sit at the published indices 0, 3, 6, ... of each ``nn.Sequential``.

=====================  ==========================================================  ======  =================
head                   layers (published keys)                                      stride  1024x768 ->
=====================  ==========================================================  ======  =================
``PoseHeatmapHead``    2 deconv ``deconv_layers.{0,3}``, 3 conv1x1                  4       K x 256 x 192
                       ``conv_layers.{0,3,6}``, ``conv_pose``
seg (``DenseHead``)    4 deconv (512, 256, 128, 64), 2 conv1x1 (64, 64), ``conv_seg``  1       29 x 1024 x 768
``NormalHead``         ``input_conv`` conv3x3, 4 ``upsample_blocks`` [conv3x3 ->   1       3 x 1024 x 768
                       4 o, PixelShuffle(2)], 3 conv3x3 ``conv_layers``,
                       ``conv_normal``
``PointmapHead``       the normal trunk, ``conv_pointmap``, and a scale branch:     1       (3 x 1024 x 768,
                       3 conv1x1 stride 2 ``scale_conv_layers`` (1536, 512, 128)             scale (1,))
                       -> Flatten -> Linear 512 -> SiLU -> Linear 128 -> SiLU ->
                       Linear 1 (``scale_final_layer.{1,3,5}``)
=====================  ==========================================================  ======  =================

Assumed where the reference is silent (marked in the code): conv biases in the normal / pointmap trunk, the
``upsample_blocks.k.0`` nesting, and the init (Normal(0, 0.001) convs as in :mod:`sapiens.models.heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from sapiens.models.heads import (
    BACKBONE_STRIDE,
    _check_features,
    _init_normal,
    _pointwise_layers,
    _upsampling_layers,
)

# Published channels (reference sapiens2.md section 2); 0.1b has no task models.
POSE_CHANNELS = {  # size -> (deconv, conv)
    "sapiens2_1b": ((1536, 1024), (768, 512, 256)),
    "default": ((1024, 768), (512, 512, 256)),  # 0.4b, 0.8b, 5b
}
SEG_DECONV_CHANNELS = (512, 256, 128, 64)
SEG_CONV_CHANNELS = (64, 64)
NORMAL_CHANNELS = {  # size -> (upsample, conv)
    "sapiens2_5b": ((1536, 768, 512, 256), (128, 64, 32)),
    "default": ((768, 512, 256, 128), (64, 32, 16)),
}
POINTMAP_CHANNELS = {
    "sapiens2_5b": ((1536, 768, 768, 768), (128, 64, 32)),
    "default": ((1536, 768, 512, 256), (64, 32, 16)),
}
SCALE_CONV_CHANNELS = (1536, 512, 128)


class PoseHeatmapHead(nn.Module):
    """Sapiens2 pose head: feature map -> K heatmaps at stride 4 (published ``PoseHeatmapHead``).

    Args:
        in_channels: backbone width C. out_channels: keypoints K (308 published).
        deconv_channels: ConvTranspose2d(k4, s2, p1, no bias) + IN + SiLU blocks.
        conv_channels: Conv1x1 (bias) + IN + SiLU blocks. init_std: Normal init of the conv weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        deconv_channels: Sequence[int] = POSE_CHANNELS["default"][0],
        conv_channels: Sequence[int] = POSE_CHANNELS["default"][1],
        init_std: float = 0.001,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.deconv_layers, channels = _upsampling_layers(in_channels, deconv_channels)
        self.conv_layers, channels = _pointwise_layers(channels, conv_channels)
        self.conv_pose = nn.Conv2d(channels, out_channels, kernel_size=1)
        self.upsample_factor = 2 ** len(deconv_channels)  # output size = token grid x this
        _init_normal(self, init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> heatmaps (B, K, h * 2**n, w * 2**n)."""
        _check_features(features, self.in_channels, type(self).__name__)
        return self.conv_pose(self.conv_layers(self.deconv_layers(features)))


def _conv_block(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """[Conv (bias; assumed), InstanceNorm2d, SiLU]."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2),
        nn.InstanceNorm2d(out_channels),
        nn.SiLU(inplace=True),
    ]


class PixelShuffleTrunk(nn.Module):
    """Shared trunk of the normal and pointmap heads: ``input_conv``, 4 pixel-shuffle ``upsample_blocks``
    (each doubles the size: conv3x3 c -> 4 o, PixelShuffle(2), IN, SiLU), 3 conv3x3 ``conv_layers``.

    Shapes: (B, C, h, w) -> (B, conv_channels[-1], h * 2**n, w * 2**n), n = len(upsample_channels).
    """

    def __init__(self, in_channels: int, upsample_channels: Sequence[int], conv_channels: Sequence[int]):
        super().__init__()
        self.in_channels = in_channels
        self.input_conv = nn.Sequential(*_conv_block(in_channels, in_channels))
        blocks, channels = [], in_channels
        for out in upsample_channels:
            conv = nn.Conv2d(channels, 4 * out, 3, padding=1)
            blocks.append(
                nn.Sequential(conv, nn.PixelShuffle(2), nn.InstanceNorm2d(out), nn.SiLU(inplace=True))
            )
            channels = out
        self.upsample_blocks = nn.ModuleList(blocks)
        layers = []
        for out in conv_channels:
            layers += _conv_block(channels, out)
            channels = out
        self.conv_layers = nn.Sequential(*layers)
        self.trunk_channels = channels
        self.upsample_factor = 2 ** len(upsample_channels)  # output size = token grid x this

    def trunk(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, c, h * 2**n, w * 2**n)."""
        _check_features(features, self.in_channels, type(self).__name__)
        x = self.input_conv(features)
        for block in self.upsample_blocks:
            x = block(x)
        return self.conv_layers(x)


class NormalHead(PixelShuffleTrunk):
    """Sapiens2 normal head: unnormalised 3-vectors at stride 1 (L2-normalise at inference).

    Args:
        in_channels: backbone width. out_channels: 3.
        upsample_channels, conv_channels: trunk widths (published: :data:`NORMAL_CHANNELS`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        upsample_channels: Sequence[int] = NORMAL_CHANNELS["default"][0],
        conv_channels: Sequence[int] = NORMAL_CHANNELS["default"][1],
        init_std: float = 0.001,
    ):
        super().__init__(in_channels, upsample_channels, conv_channels)
        self.conv_normal = nn.Conv2d(self.trunk_channels, out_channels, kernel_size=1)
        _init_normal(self, init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 16h, 16w) raw normals."""
        return self.conv_normal(self.trunk(features))


class PointmapOutput(NamedTuple):
    """Pointmap head output: canonical XYZ (B, 3, H, W) and the canonical scale s (B, 1); metric = XYZ / s."""

    points: torch.Tensor
    scale: torch.Tensor


def scale_grid(grid: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """Feature grid (h, w) after 1x1 convs of ``strides`` (padding 0: ceil(h / s) each)."""
    h, w = grid
    for s in strides:
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
    return h, w


class PointmapHead(PixelShuffleTrunk):
    """Sapiens2 pointmap head: canonical XYZ at stride 1 plus the canonical scale from the backbone features.

    Args:
        in_channels: backbone width. out_channels: 3.
        image_size: (H, W) of the inputs; sizes the scale branch's first Linear (published 128 x 8 x 6).
        upsample_channels, conv_channels: trunk widths (published: :data:`POINTMAP_CHANNELS`).
        scale_channels: widths of the stride-2 conv1x1 scale blocks (1536, 512, 128).
        scale_strides: their strides (published 2, 2, 2: 64x48 -> 8x6). Small CPU inputs use fewer halvings,
            since InstanceNorm needs more than one position to normalise.
        z_init: initial bias of the Z output (0 by default; the published init is not known). Starting
            near the data's canonical depth (about 1.3 for a person filling the frame, with f_c = the input
            width) spares short runs the many steps a regression head needs to climb from 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        image_size: Sequence[int] = (1024, 768),
        upsample_channels: Sequence[int] = POINTMAP_CHANNELS["default"][0],
        conv_channels: Sequence[int] = POINTMAP_CHANNELS["default"][1],
        scale_channels: Sequence[int] = SCALE_CONV_CHANNELS,
        scale_strides: Sequence[int] = (2, 2, 2),
        init_std: float = 0.001,
        z_init: float = 0.0,
    ):
        super().__init__(in_channels, upsample_channels, conv_channels)
        if len(scale_strides) != len(scale_channels):
            raise ValueError(
                f"scale_strides {scale_strides} needs one stride per scale channel {scale_channels}"
            )
        self.conv_pointmap = nn.Conv2d(self.trunk_channels, out_channels, kernel_size=1)
        layers, channels = [], in_channels
        for out, stride in zip(scale_channels, scale_strides, strict=True):
            layers += _conv_block(channels, out, kernel=1, stride=stride)
            channels = out
        self.scale_conv_layers = nn.Sequential(*layers)
        h, w = scale_grid([s // BACKBONE_STRIDE for s in image_size], scale_strides)
        if h * w < 2:
            raise ValueError(
                f"the pointmap scale branch reduces a {image_size[0]}x{image_size[1]} input to 1x1, where "
                "InstanceNorm is undefined; use fewer stride-2 scale convs (task_head.head.scale_strides)"
            )
        self.scale_final_layer = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * h * w, 512),
            nn.SiLU(inplace=True),
            nn.Linear(512, 128),
            nn.SiLU(inplace=True),
            nn.Linear(128, 1),
        )
        _init_normal(self, init_std)
        with torch.no_grad():
            self.conv_pointmap.bias[2] = z_init

    def forward(self, features: torch.Tensor) -> PointmapOutput:
        """(B, C, h, w) -> PointmapOutput(points (B, 3, 16h, 16w), scale (B, 1))."""
        points = self.conv_pointmap(self.trunk(features))
        return PointmapOutput(points, self.scale_final_layer(self.scale_conv_layers(features)))


def identify_head(state: dict[str, torch.Tensor], family: str | None = None) -> dict:
    """The task head held by an (unprefixed) head state dict, from its key names and tensor shapes.

    Returns ``{"task": "pose" | "seg" | "depth" | "normal" | "pointmap" | None, "layout": "sapiens" |
    "sapiens2", "outputs": K / classes / 3 / 1, and the widths needed to rebuild it: "deconv_channels",
    "conv_channels" and, for the pixel-shuffle heads, "upsample_channels"}``.
    """

    def widths(prefix: str, dim: int = 0) -> list[int]:
        keys = sorted(
            (k for k in state if k.startswith(prefix) and k.endswith(".weight") and state[k].ndim == 4),
            key=lambda k: [int(p) for p in k[len(prefix) :].split(".")[:-1] if p.isdigit()],
        )
        return [int(state[k].shape[dim]) for k in keys]

    info: dict = {"task": None, "layout": "sapiens2" if family == "sapiens2" else "sapiens", "outputs": None}
    final = {"conv_pose": "pose", "final_layer": "pose", "conv_normal": "normal", "conv_pointmap": "pointmap"}
    for name, task in final.items():
        if f"{name}.weight" in state:
            info.update(task=task, outputs=int(state[f"{name}.weight"].shape[0]))
            info["layout"] = "sapiens" if name == "final_layer" else "sapiens2"
    if "conv_seg.weight" in state:
        outputs = int(state["conv_seg.weight"].shape[0])
        info["outputs"] = outputs
        info["task"] = {1: "depth", 3: "normal"}.get(outputs, "seg")
    info["deconv_channels"] = widths("deconv_layers.", dim=1)  # ConvTranspose2d: (in, out, k, k)
    info["conv_channels"] = widths("conv_layers.")
    if "input_conv.0.weight" in state:
        info["upsample_channels"] = [c // 4 for c in widths("upsample_blocks.")]
    return info
