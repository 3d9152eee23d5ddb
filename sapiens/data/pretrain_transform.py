"""MAE pretraining augmentation: random resized crop and horizontal flip (cv2), uint8 output.

Normalisation runs on the device (:func:`sapiens.data.normalize.normalize_images`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD, image_to_tensor

# Kept for callers that imported the statistics from here.
IMAGENET_MEAN, IMAGENET_STD = IMAGE_MEAN, IMAGE_STD
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


def sample_resized_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Pick a crop box ``(top, left, crop_h, crop_w)`` the way torchvision's RandomResizedCrop does.

    The area fraction is uniform in ``scale`` and the aspect ratio (w / h) log-uniform in
    ``ratio``; after ``attempts`` boxes that do not fit, fall back to the largest centred crop
    whose aspect ratio is clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, round(height * max(ratio))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class PretrainTransform:
    """Decoded pretraining sample -> ``{"image": uint8 tensor (3, H, W)}`` (RGB 0..255).

    The image is not normalised here: the LightningModule does it on the device after the
    batch transfer (:func:`sapiens.data.normalize.normalize_images`), which keeps the workers
    cheap and the batches 4x smaller.

    Args:
        image_size: output (H, W), or one int for a square.
        scale: range of the crop's area fraction of the image.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
        hflip_prob: probability of a horizontal flip.
        interpolation: ``bicubic`` (default, as MAE), ``bilinear``, ``area`` or ``nearest``.
        antialias: before a large down-scale, halve the crop with ``cv2.pyrDown`` (Gaussian
            low-pass) while it stays at least twice the output size: cv2's cubic resize does
            not low-pass, so large down-scales would alias. pyrDown is ~2x cheaper than
            ``area`` resizing at arbitrary factors.
        seed: seed of the private RNG; the shard pipeline calls :meth:`reseed` per
            (seed, epoch, rank, worker), which makes streams reproducible.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = (224, 224),
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        interpolation: str = "bicubic",
        antialias: bool = True,
        seed: int | None = None,
    ):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive ints, got {image_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}")
        self.image_size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip_prob = float(hflip_prob)
        self.interpolation = interpolation
        self.antialias = antialias
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the private RNG (called by the shard pipeline at each worker/epoch start)."""
        self.rng = np.random.default_rng(seed)

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``sample["image"]``: (H, W, 3) uint8 RGB -> ``{"image": uint8 (3, out_h, out_w)}``."""
        image = sample["image"]
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"PretrainTransform expects an (H, W, 3) uint8 array, got {got}")
        top, left, crop_h, crop_w = sample_resized_crop(
            image.shape[0], image.shape[1], self.scale, self.ratio, self.rng
        )
        crop = image[top : top + crop_h, left : left + crop_w]
        out_h, out_w = self.image_size
        if self.antialias:
            while crop.shape[0] >= 2 * out_h and crop.shape[1] >= 2 * out_w:
                crop = cv2.pyrDown(crop)
        resized = cv2.resize(crop, (out_w, out_h), interpolation=INTERPOLATIONS[self.interpolation])
        if self.rng.random() < self.hflip_prob:
            resized = cv2.flip(resized, 1)  # a new array, not a negative-stride view
        return {"image": image_to_tensor(resized)}
