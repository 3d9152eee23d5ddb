"""Image normalisation, split between the data workers (uint8) and the device (float).

The sample transforms emit images as uint8 ``(3, H, W)`` tensors: converting to float32 on the CPU
cost more than decoding the JPEG at 1024x768 and made every batch 4x larger to pass between
processes and copy to the accelerator. :func:`normalize_images` then runs on the device, from
``SapiensModule.on_after_batch_transfer``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "image_to_tensor", "normalize_images"]

IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB array -> (3, H, W) uint8 tensor sharing its memory where possible.

    The result is a channel-first *view* of channel-last memory (no copy); the batch collate
    (:func:`sapiens.data.collate.collate_dicts`) copies it into a channel-last (B, H, W, 3) block
    and returns a (B, 3, H, W) view of that, so each sample is copied once, without a transpose.
    Arrays with negative strides (e.g. ``a[:, ::-1]``) are made contiguous first because torch
    cannot view them.
    """
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image_to_tensor expects an (H, W, 3) uint8 array, got {got}")
    if image.dtype != np.uint8:
        raise ValueError(f"image_to_tensor expects uint8 pixels, got {image.dtype}")
    if any(s < 0 for s in image.strides):
        image = np.ascontiguousarray(image)
    return torch.from_numpy(image).permute(2, 0, 1)


def normalize_images(images: torch.Tensor, mean: tuple = IMAGE_MEAN, std: tuple = IMAGE_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) RGB 0..255 -> float32 ``(images - mean) / std``, same device.

    Float input is returned unchanged (it is taken to be normalised already), so the function is
    safe to apply twice and to batches built from pre-normalised tensors.
    """
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_images expects uint8 or float images, got {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize_images expects (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    mean_t, std_t = _stats_on(images.device, tuple(mean), tuple(std))
    if images.ndim == 3:
        mean_t, std_t = mean_t[0], std_t[0]
    # Batches arrive channel-last (see collate); the models .view() their input, so make it
    # contiguous here, while it is still uint8 (a quarter of the bytes of the float copy).
    return (images.contiguous().float() - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _stats_on(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) float32 mean and std on ``device``, built once (no host->device copy per step)."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, s
