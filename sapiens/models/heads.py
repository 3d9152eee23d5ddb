"""Task heads that turn the ViT feature map into pose heatmaps, part logits, depth or normals.

Every head takes the backbone feature map ``(B, C, H/16, W/16)`` (patch size 16, no cls token) and
upsamples it with stride-2 transposed convolutions. The parameter names follow the published Sapiens
checkpoints, so a published state dict maps onto these modules by a plain prefix rename
(``head.`` for pose, ``decode_head.`` for seg / depth / normal):

================  ======================================  ===========  =====================
head              published layers (deconv / conv)        out stride   1024x768 input ->
================  ======================================  ===========  =====================
``HeatmapHead``   2 x 768 / 2 x 768, ``final_layer``      4            K x 256 x 192
``seg_head``      3 x 768 / 3 x 768, ``conv_seg`` -> 28    2            28 x 512 x 384
``normal_head``   3 x 768 / 3 x 768, ``conv_seg`` -> 3     2            3 x 512 x 384
``depth_head``    4 x 384 / 2 x 384, ``conv_seg`` -> 1     1            1 x 1024 x 768
================  ======================================  ===========  =====================

Output stride = 16 / 2**len(deconv_channels). Each deconv / conv block is
``[Conv, InstanceNorm2d(affine=False), SiLU]`` inside one ``nn.Sequential``, so weights sit at
indices 0, 3, 6, ... exactly as in the published keys; the instance norms carry no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# The published backbones' patch size (the token grid of a published input size).
BACKBONE_STRIDE = 16

# Published channel counts (reference sapiens.md 3a-3d).
POSE_DECONV_CHANNELS = (768, 768)
POSE_CONV_CHANNELS = (768, 768)
SEG_DECONV_CHANNELS = (768, 768, 768)
SEG_CONV_CHANNELS = (768, 768, 768)
DEPTH_DECONV_CHANNELS = (384, 384, 384, 384)
DEPTH_CONV_CHANNELS = (384, 384)


def _upsampling_layers(in_channels: int, channels: Sequence[int]) -> tuple[nn.Sequential, int]:
    """Stack of ``[ConvTranspose2d(k4, s2, p1, no bias), InstanceNorm2d, SiLU]`` blocks.

    Each block doubles the spatial size. Returns the stack and its output channel count.
    """
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels, affine=False),
            nn.SiLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers), in_channels


def _pointwise_layers(
    in_channels: int, channels: Sequence[int], kernel_size: int = 1
) -> tuple[nn.Sequential, int]:
    """Stack of ``[Conv2d(k, same padding, bias), InstanceNorm2d, SiLU]`` blocks (size kept)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"conv_kernel_size must be odd to keep the size, got {kernel_size}")
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.InstanceNorm2d(out_channels, affine=False),
            nn.SiLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers), in_channels


def _init_normal(module: nn.Module, std: float) -> None:
    """Normal(0, std) weights and zero biases for every (transposed) convolution in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_features(x: torch.Tensor, in_channels: int, head: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{head} expects a backbone feature map (B, {in_channels}, h, w); got shape "
            f"{tuple(x.shape)}. Use the backbone with out_type='featmap' and no cls token."
        )


class HeatmapHead(nn.Module):
    """Top-down pose head: feature map -> K keypoint heatmaps.

    Args:
        in_channels: backbone embedding dim C.
        num_keypoints: K (17, 133, 308, ...).
        deconv_channels: one stride-2 upsampling block per entry (published: (768, 768)).
        conv_channels: one 1x1 conv block per entry (published: (768, 768)).
        init_std: std of the Normal init of all conv weights (published 0.001); biases are 0.

    Shapes: ``(B, C, h, w)`` float -> ``(B, K, h * 2**n, w * 2**n)`` with n = len(deconv_channels);
    with the published n = 2 and a stride-16 backbone the heatmaps have stride 4.
    """

    def __init__(
        self,
        in_channels: int,
        num_keypoints: int,
        deconv_channels: Sequence[int] = POSE_DECONV_CHANNELS,
        conv_channels: Sequence[int] = POSE_CONV_CHANNELS,
        init_std: float = 0.001,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        self.deconv_layers, channels = _upsampling_layers(in_channels, deconv_channels)
        self.conv_layers, channels = _pointwise_layers(channels, conv_channels)
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self.upsample_factor = 2 ** len(deconv_channels)  # output size = token grid x this
        _init_normal(self, init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> heatmaps (B, K, h * 2**n, w * 2**n)."""
        _check_features(features, self.in_channels, type(self).__name__)
        return self.final_layer(self.conv_layers(self.deconv_layers(features)))


class DenseHead(nn.Module):
    """Dense prediction head (published ``VitHead`` / ``VitNormalHead`` / ``VitDepthHead`` layout).

    Args:
        in_channels: backbone embedding dim C.
        out_channels: 28 for part segmentation logits, 3 for normals, 1 for depth.
        deconv_channels: one stride-2 upsampling block per entry.
        conv_channels: one conv block per entry (kernel ``conv_kernel_size``, size kept).
        dropout: Dropout2d probability before ``conv_seg`` (published 0.1). Kept as a separate
            attribute so ``conv_layers`` indices match the published keys.
        conv_kernel_size: kernel of the conv blocks (published 1).
        init_std: std of the Normal init of the conv / deconv weights; biases are 0.
            The published code's exact init is not verified; the value only matters at step 0.

    Shapes: ``(B, C, h, w)`` float -> ``(B, out_channels, h * 2**n, w * 2**n)``,
    n = len(deconv_channels). Outputs are raw (logits, unnormalised normals, unbounded depth).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
        conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
        dropout: float = 0.1,
        conv_kernel_size: int = 1,
        init_std: float = 0.001,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deconv_layers, channels = _upsampling_layers(in_channels, deconv_channels)
        self.conv_layers, channels = _pointwise_layers(channels, conv_channels, conv_kernel_size)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, out_channels, kernel_size=1)
        self.upsample_factor = 2 ** len(deconv_channels)  # output size = token grid x this
        _init_normal(self, init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, out_channels, h * 2**n, w * 2**n)."""
        _check_features(features, self.in_channels, type(self).__name__)
        x = self.conv_layers(self.deconv_layers(features))
        return self.conv_seg(self.dropout(x))


def seg_head(
    in_channels: int,
    num_classes: int = 28,
    deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
    conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
    dropout: float = 0.1,
) -> DenseHead:
    """Body-part segmentation head: (B, C, h, w) -> logits (B, num_classes, 8h, 8w), stride 2."""
    return DenseHead(in_channels, num_classes, deconv_channels, conv_channels, dropout)


def normal_head(
    in_channels: int,
    deconv_channels: Sequence[int] = SEG_DECONV_CHANNELS,
    conv_channels: Sequence[int] = SEG_CONV_CHANNELS,
    dropout: float = 0.1,
) -> DenseHead:
    """Surface-normal head: (B, C, h, w) -> raw normals (B, 3, 8h, 8w), stride 2."""
    return DenseHead(in_channels, 3, deconv_channels, conv_channels, dropout)


def depth_head(
    in_channels: int,
    deconv_channels: Sequence[int] = DEPTH_DECONV_CHANNELS,
    conv_channels: Sequence[int] = DEPTH_CONV_CHANNELS,
    dropout: float = 0.1,
) -> DenseHead:
    """Relative-depth head: (B, C, h, w) -> depth (B, 1, 16h, 16w), stride 1."""
    return DenseHead(in_channels, 1, deconv_channels, conv_channels, dropout)
