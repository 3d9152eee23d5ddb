"""Surface looks: skin tones, hair colours, clothing colours with simple procedural patterns."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SOLID, STRIPES, CHECKER = 0, 1, 2

# Light to dark skin tones (RGB 0..1); a tone is a random blend of two neighbours.
SKIN_TONES = np.array(
    [[0.98, 0.86, 0.76], [0.93, 0.76, 0.62], [0.82, 0.62, 0.46], [0.63, 0.44, 0.30],
     [0.45, 0.30, 0.20], [0.30, 0.20, 0.14]]
)  # fmt: skip
HAIR_COLOURS = np.array(
    [[0.05, 0.04, 0.03], [0.22, 0.13, 0.07], [0.45, 0.30, 0.15], [0.85, 0.72, 0.45],
     [0.60, 0.25, 0.10], [0.70, 0.70, 0.70]]
)  # fmt: skip


@dataclass
class Material:
    """Albedo of a surface: ``color`` or, where the pattern is on, ``color2``.

    Attributes:
        color, color2: float (3,) RGB in 0..1.
        pattern: SOLID, STRIPES (along the texture frame's axis 1) or CHECKER (axes 0 and 1).
        frequency: pattern cycles per metre.
        phase: pattern offset in cycles.
        specular: strength of the highlight (0..1).
        front_color: float (3,) RGB of a panel down the front of the shape (a shirt front under an
            open jacket, a print), or None. "Front" is the +z half of the shape's texture frame, which
            for torso ellipsoids is the direction the person faces: a front/back cue that real
            clothing gives and that left/right keypoints need (left is on the image right only
            for a person seen from the front).
    """

    color: np.ndarray
    color2: np.ndarray
    pattern: int = SOLID
    frequency: float = 10.0
    phase: float = 0.0
    specular: float = 0.1
    front_color: np.ndarray | None = None


@dataclass
class PersonLook:
    """Materials and garment choices of one person."""

    skin: Material
    hair: Material
    upper: Material
    lower: Material
    shoes: Material
    shirt: bool  # False: bare torso (Torso class instead of Upper_Clothing)
    sleeve: int  # 0 none, 1 short, 2 long
    long_pants: bool
    hair_style: int  # 0 none, 1 short, 2 long
    eyes: Material
    mouth: Material


def random_color(rng: np.random.Generator) -> np.ndarray:
    """A random garment colour (float (3,) in 0..1), spread over hue, saturation and value."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.12, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def garment(rng: np.random.Generator) -> Material:
    """A clothing material: solid half of the time, else stripes or checks."""
    pattern = int(rng.choice([SOLID, SOLID, STRIPES, CHECKER]))
    return Material(
        color=random_color(rng),
        color2=random_color(rng),
        pattern=pattern,
        frequency=float(rng.uniform(6.0, 30.0)),
        phase=float(rng.random()),
        specular=float(rng.uniform(0.0, 0.15)),
    )


def sample_look(rng: np.random.Generator) -> PersonLook:
    """Random skin, hair, clothes and shoes for one person."""
    i = int(rng.integers(0, len(SKIN_TONES) - 1))
    tone = SKIN_TONES[i] + (SKIN_TONES[i + 1] - SKIN_TONES[i]) * rng.random()
    tone = np.clip(tone * rng.uniform(0.92, 1.05, 3), 0.0, 1.0)
    skin = Material(tone, tone * 0.97, specular=float(rng.uniform(0.05, 0.25)))
    hair_col = HAIR_COLOURS[int(rng.integers(0, len(HAIR_COLOURS)))] * rng.uniform(0.85, 1.1)
    hair = Material(
        np.clip(hair_col, 0, 1),
        np.clip(hair_col * 0.75, 0, 1),
        pattern=STRIPES,
        frequency=float(rng.uniform(60.0, 120.0)),
        specular=0.2,
    )
    shoes = Material(random_color(rng) * 0.6, random_color(rng) * 0.6, specular=0.3)
    upper = garment(rng)
    if rng.random() < 0.75:  # most tops show a differently coloured front
        upper.front_color = _contrasting(rng, upper.color)
    eye_col = rng.uniform(0.03, 0.15) * np.array([1.0, 0.85, 0.7])
    eyes = Material(eye_col, eye_col, specular=0.4)
    lip_col = np.clip(tone * np.array([0.75, 0.42, 0.42]), 0.0, 1.0)
    mouth = Material(lip_col, lip_col, specular=0.15)
    return PersonLook(
        skin=skin,
        hair=hair,
        upper=upper,
        lower=garment(rng),
        shoes=shoes,
        shirt=bool(rng.random() < 0.9),
        sleeve=int(rng.integers(0, 3)),
        long_pants=bool(rng.random() < 0.6),
        hair_style=int(rng.choice([0, 1, 1, 2])),
        eyes=eyes,
        mouth=mouth,
    )


def _contrasting(rng: np.random.Generator, color: np.ndarray) -> np.ndarray:
    """A random colour at least 0.35 (RGB Euclidean) away from ``color``, so the panel shows."""
    for _ in range(20):
        candidate = random_color(rng)
        if np.linalg.norm(candidate - color) >= 0.35:
            return candidate
    return np.where(color > 0.5, color * 0.25, 0.75 + color * 0.25)
