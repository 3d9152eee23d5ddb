"""Person boxes for top-down pose without a detector dependency.

In order of preference (``boxes=auto``): boxes given by the caller or a COCO detections JSON
(``boxes=FILE``), the connected components of a seg model's foreground run in the same call, the
previous video frame's keypoints (:class:`sapiens.predict.tracking.PoseTracker`), the full image.
Every box is then padded by 1.25 and grown to the model's aspect ratio when cropped
(:func:`sapiens.data.topdown.bbox_xywh_to_center_scale`), as in validation.
"""

from __future__ import annotations

import cv2
import numpy as np

from sapiens.data.pose_transform import load_person_detections

__all__ = [
    "boxes_from_foreground",
    "boxes_from_keypoints",
    "full_image_box",
    "load_person_detections",
]

# A foreground component smaller than this share of the largest one is a speck, not a person.
MIN_COMPONENT_SHARE = 0.05
MIN_COMPONENT_PIXELS = 16
# Keypoint extents are tighter than person boxes (no head top, no feet soles): widen like rtmlib's tracker.
KEYPOINT_BOX_SCALE = 1.25


def full_image_box(height: int, width: int) -> np.ndarray:
    """float32 (1, 4) [x, y, w, h] covering the image."""
    return np.array([[0.0, 0.0, float(width), float(height)]], np.float32)


def boxes_from_foreground(mask: np.ndarray) -> np.ndarray:
    """Boxes of the 8-connected components of a foreground mask, largest first.

    Components under :data:`MIN_COMPONENT_SHARE` of the largest (or under 16 pixels) are dropped.
    People who touch form one component, hence one box.

    Args:
        mask: bool (H, W).

    Returns:
        float32 (N, 4) [x, y, w, h] tight boxes; (0, 4) for an empty foreground.
    """
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    stats = stats[1:]  # row 0 is the background
    if count <= 1:
        return np.zeros((0, 4), np.float32)
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = (areas >= MIN_COMPONENT_SHARE * areas.max()) & (areas >= MIN_COMPONENT_PIXELS)
    order = np.argsort(-areas[keep], kind="stable")
    boxes = stats[keep][order][:, [cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT]]
    return boxes.astype(np.float32)


def boxes_from_keypoints(
    keypoints: np.ndarray, scores: np.ndarray, thr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around each person's confident keypoints, widened by 1.25 about their centre.

    Args:
        keypoints: float (N, K, 2); scores: (N, K); thr: keypoints scoring above it count.

    Returns:
        float32 (M, 4) [x, y, w, h] for the persons with at least two confident keypoints (M <= N),
        and the int64 (M,) indices of those persons.
    """
    boxes, index = [], []
    for n in range(keypoints.shape[0]):
        good = keypoints[n][scores[n] > thr]
        if good.shape[0] < 2:
            continue
        lo, hi = good.min(0), good.max(0)
        centre, size = (lo + hi) / 2, np.maximum(hi - lo, 1.0) * KEYPOINT_BOX_SCALE
        boxes.append([*(centre - size / 2), *size])
        index.append(n)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(index, np.int64)
