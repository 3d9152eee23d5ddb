"""Small image helpers shared by the validation pictures and predict's overlays: de-normalise, tile,
save PNG, blend, colour maps."""

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


def upscale(image: np.ndarray, min_height: int = 192) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so that small images stay readable."""
    factor = max(1, int(np.ceil(min_height / image.shape[0])))
    if factor == 1:
        return image
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)


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


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Alpha-blend an (H, W, 3) uint8 ``overlay`` over ``image`` (rounded)."""
    return cv2.addWeighted(image, 1 - alpha, overlay, alpha, 0.0)


def colorize(
    values: np.ndarray, mask: np.ndarray, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 with a perceptual colormap; black outside ``mask``.

    The colours span ``value_range`` (lo, hi) when given (fixed over a video), else min-max over ``mask``.
    """
    out = np.zeros((*values.shape, 3), np.uint8)
    if mask.any():
        lo, hi = value_range if value_range is not None else (values[mask].min(), values[mask].max())
        scaled = np.clip((values - lo) / max(float(hi - lo), 1e-8), 0, 1)
        mapped = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
        out[mask] = cv2.cvtColor(mapped, cv2.COLOR_BGR2RGB)[mask]
    return out


def normals_to_rgb(normals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3, H, W) unit normals -> (H, W, 3) uint8 RGB = (n + 1) / 2; black outside ``mask``."""
    rgb = ((normals.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    rgb[~mask.astype(bool)] = 0
    return rgb


def paste_foreground(image: np.ndarray, picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``picture`` (H, W, 3) uint8 where ``mask`` (H, W) is set, ``image`` elsewhere."""
    out = image.copy()
    out[mask] = picture[mask]
    return out
