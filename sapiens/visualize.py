"""Small image helpers shared by the picture callbacks: de-normalise, tile, save PNG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def denormalize(image: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """(3, H, W) normalised float tensor -> (H, W, 3) uint8 RGB."""
    m = torch.as_tensor(mean, device=image.device).view(3, 1, 1)
    s = torch.as_tensor(std, device=image.device).view(3, 1, 1)
    x = (image.float() * s + m).clamp(0, 255).round().byte()
    return x.permute(1, 2, 0).cpu().numpy()


def tile(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Grid of (H, W, 3) uint8 images (all the same size) with a white gap -> (H', W', 3) uint8."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = img
    return out


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) RGB uint8 array as PNG, creating folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
