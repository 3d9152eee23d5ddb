"""Random backgrounds: gradients, stripes/checks, smooth noise, a floor and clutter shapes."""

from __future__ import annotations

import cv2
import numpy as np

from data.synthhumans.materials import random_color


def sample_background(rng: np.random.Generator, height: int, width: int, clutter: bool = True) -> np.ndarray:
    """A random background image, float32 (H, W, 3) RGB in 0..1.

    ``clutter=False``: a colour gradient with an optional floor only (no stripes, checks, noise or
    clutter shapes), the ``simple`` scenes.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys /= height
    xs /= width
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = random_color(rng), random_color(rng)
    img = c0[None, None, :] + (c1 - c0)[None, None, :] * ramp[..., None]
    texture = int(rng.integers(0, 4)) if clutter else 0
    if texture == 1:  # stripes
        freq = rng.uniform(3, 25)
        a2 = rng.uniform(0, np.pi)
        on = np.mod((np.cos(a2) * xs + np.sin(a2) * ys) * freq, 1.0) < 0.5
        img = np.where(on[..., None], img, img * rng.uniform(0.5, 0.9))
    elif texture == 2:  # checks
        freq = rng.uniform(3, 16)
        on = (np.mod(xs * freq, 1.0) < 0.5) ^ (np.mod(ys * freq * width / height, 1.0) < 0.5)
        img = np.where(on[..., None], img, random_color(rng)[None, None, :])
    elif texture == 3:  # smooth coloured noise
        cells = int(rng.integers(3, 12))
        noise = rng.random((cells, cells, 3)).astype(np.float32)
        noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
        img = img * 0.5 + noise * 0.5
    if rng.random() < 0.5:  # a floor below a horizon line
        horizon = int(rng.uniform(0.3, 0.8) * height)
        floor = random_color(rng)
        shade = np.linspace(0.7, 1.0, height - horizon, dtype=np.float32)[:, None, None]
        img[horizon:] = img[horizon:] * 0.3 + floor[None, None, :] * shade * 0.7
    img = np.ascontiguousarray(np.clip(img, 0, 1), dtype=np.float32)
    for _ in range(int(rng.integers(0, 9)) if clutter else 0):  # clutter
        color = tuple(float(c) for c in random_color(rng))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(2, width // 30), max(3, width // 3)))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            cv2.circle(img, (x, y), size // 2, color, -1, lineType=cv2.LINE_AA)
        elif shape == 1:
            x2, y2 = x + int(rng.integers(-size, size)), y + int(rng.integers(-size, size))
            cv2.rectangle(img, (x, y), (x2, y2), color, -1)
        else:
            x2, y2 = int(rng.integers(0, width)), int(rng.integers(0, height))
            cv2.line(img, (x, y), (x2, y2), color, max(1, size // 8), lineType=cv2.LINE_AA)
    return img
