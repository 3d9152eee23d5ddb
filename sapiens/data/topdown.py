"""Top-down crop geometry: person box -> (centre, scale) -> UDP affine crop and its inverse.

Conventions: points are (x, y) in pixels with pixel centres on integer coordinates; ``scale`` is
the (w, h) extent in image pixels of the region that becomes the crop. The UDP affine maps the
region's edges ``centre -/+ scale/2`` onto the first/last crop pixel centres ``0`` and
``size - 1``, i.e. ``crop = S R (p - centre) + (size - 1) / 2`` with
``S = diag((size - 1) / scale)`` and ``R`` a rotation by ``rot`` degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "bbox_xywh_to_center_scale",
    "crop_to_image",
    "fix_aspect_ratio",
    "hflip_matrix",
    "invert_affine",
    "transform_points",
    "udp_affine_matrix",
    "warp_image",
]


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of (w, h) so that w / h == aspect_ratio.

    Args:
        scale: float (..., 2) box extent (w, h).
        aspect_ratio: target width / height (input W / H, e.g. 768 / 1024).

    Returns:
        float32 (..., 2) with the same centre semantics, never smaller than the input.
    """
    scale = np.asarray(scale, dtype=np.float32)
    w, h = scale[..., 0], scale[..., 1]
    wider = w > h * aspect_ratio
    return np.stack(
        [np.where(wider, w, h * aspect_ratio), np.where(wider, w / aspect_ratio, h)], axis=-1
    ).astype(np.float32)


def bbox_xywh_to_center_scale(
    bbox: np.ndarray | Sequence[float],
    aspect_ratio: float | None = None,
    padding: float = 1.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert COCO boxes to (centre, scale).

    Args:
        bbox: float (4,) or (N, 4) boxes [x, y, w, h] (top-left corner + size).
        aspect_ratio: input W / H; when given, the padded box is enlarged to that aspect ratio.
        padding: multiplicative context margin (1.25 in Sapiens/mmpose top-down).

    Returns:
        center float32 (2,) or (N, 2); scale float32 (2,) or (N, 2) = padded (w, h).
    """
    box = np.asarray(bbox, dtype=np.float32)
    if box.shape[-1] != 4:
        raise ValueError(f"bbox must be [x, y, w, h], got shape {box.shape}")
    center = box[..., :2] + 0.5 * box[..., 2:]
    scale = box[..., 2:] * padding
    if aspect_ratio is not None:
        scale = fix_aspect_ratio(scale, aspect_ratio)
    return center.astype(np.float32), scale.astype(np.float32)


def udp_affine_matrix(
    center: Sequence[float] | np.ndarray,
    scale: Sequence[float] | np.ndarray,
    rot: float,
    output_size: Sequence[int],
) -> np.ndarray:
    """Image -> crop affine matrix under UDP.

    Args:
        center: (2,) region centre (x, y) in image pixels.
        scale: (2,) region extent (w, h) in image pixels (> 0).
        rot: rotation in degrees (the region is rotated about its centre).
        output_size: crop size (W, H).

    Returns:
        float32 (2, 3) matrix for ``cv2.warpAffine`` / :func:`transform_points`.
    """
    cx, cy = (float(v) for v in center)
    sw, sh = (float(v) for v in scale)
    if sw <= 0 or sh <= 0:
        raise ValueError(f"scale must be positive, got {(sw, sh)}")
    out_w, out_h = (float(v) for v in output_size)
    sx, sy = (out_w - 1.0) / sw, (out_h - 1.0) / sh
    theta = np.deg2rad(rot)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    linear = np.array([[sx * cos, -sx * sin], [sy * sin, sy * cos]], dtype=np.float64)
    offset = np.array([(out_w - 1.0) / 2, (out_h - 1.0) / 2]) - linear @ np.array([cx, cy])
    return np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32)


def hflip_matrix(matrix: np.ndarray, width: int) -> np.ndarray:
    """Compose a horizontal mirror of the crop (x -> width - 1 - x) after ``matrix``.

    Args:
        matrix: float (2, 3) image -> crop affine; width: crop width W.

    Returns:
        float32 (2, 3).
    """
    flipped = np.asarray(matrix, dtype=np.float32).copy()
    flipped[0] = -flipped[0]
    flipped[0, 2] += width - 1
    return flipped


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, float32 (2, 3)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64)).astype(np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to points.

    Args:
        points: float (..., 2) (x, y).
        matrix: float (2, 3).

    Returns:
        float32 (..., 2).
    """
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def warp_image(image: np.ndarray, matrix: np.ndarray, output_size: Sequence[int]) -> np.ndarray:
    """Bilinear affine warp of an image; pixels outside the source become 0.

    Args:
        image: (H, W) or (H, W, C) array (uint8 or float32).
        matrix: float (2, 3) image -> crop.
        output_size: (W, H) of the crop.

    Returns:
        (H_out, W_out[, C]) array of the input dtype.
    """
    size = (int(output_size[0]), int(output_size[1]))
    return cv2.warpAffine(
        image,
        np.asarray(matrix, dtype=np.float32),
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def crop_to_image(
    points: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    input_size: Sequence[int],
    rot: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Map crop-pixel predictions back to image pixels (inverse UDP affine).

    Args:
        points: float (K, 2) or (N, K, 2) keypoints in crop pixels (e.g. ``UDPHeatmap.decode``).
        center: float (2,) or (N, 2) crop centres in image pixels.
        scale: float (2,) or (N, 2) crop extents (w, h) in image pixels.
        input_size: crop size (W, H).
        rot: rotation in degrees, scalar or (N,) (0 at test time).

    Returns:
        float32 with the shape of ``points``, in image pixels.
    """
    pts = np.asarray(points, dtype=np.float32)
    single = pts.ndim == 2
    pts = pts[None] if single else pts
    centers = np.asarray(center, dtype=np.float32).reshape(-1, 2)
    scales = np.asarray(scale, dtype=np.float32).reshape(-1, 2)
    rots = np.broadcast_to(np.asarray(rot, dtype=np.float32), (pts.shape[0],))
    if centers.shape[0] != pts.shape[0] or scales.shape[0] != pts.shape[0]:
        raise ValueError(
            f"got {pts.shape[0]} keypoint sets but {centers.shape[0]} centres / {scales.shape[0]} scales"
        )
    out = np.stack(
        [
            transform_points(p, invert_affine(udp_affine_matrix(c, s, r, input_size)))
            for p, c, s, r in zip(pts, centers, scales, rots, strict=True)
        ]
    )
    return out[0] if single else out
