"""Typed results of :class:`sapiens.predict.Predictor`: one dataclass per task, all at source resolution."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PoseResult:
    """Top-down keypoints of the persons of one image.

    Attributes:
        boxes: float32 (N, 4) person boxes [x, y, w, h] in image pixels (before the 1.25 crop padding).
        box_scores: float32 (N,) detection score of each box (1 for boxes that are not detections).
        keypoints: float32 (N, K, 2) (x, y) in image pixels.
        keypoint_scores: float32 (N, K) heatmap maxima.
        box_source: where the boxes came from: ``given``, ``file``, ``seg``, ``track`` or ``full``.
        track_ids: int64 (N,) track of each person in a video (None for still images).
    """

    boxes: np.ndarray
    box_scores: np.ndarray
    keypoints: np.ndarray
    keypoint_scores: np.ndarray
    box_source: str = "full"
    track_ids: np.ndarray | None = None

    @property
    def num_persons(self) -> int:
        return int(self.boxes.shape[0])

    def instances(self) -> list[dict]:
        """One JSON-able dict per person: bbox, bbox_score, keypoints [[x, y], ...], keypoint_scores."""
        out = []
        for n in range(self.num_persons):
            person = {
                "bbox": [round(float(v), 2) for v in self.boxes[n]],
                "bbox_score": round(float(self.box_scores[n]), 4),
                "keypoints": np.round(self.keypoints[n], 2).tolist(),
                "keypoint_scores": np.round(self.keypoint_scores[n], 4).tolist(),
            }
            if self.track_ids is not None:
                person["track_id"] = int(self.track_ids[n])
            out.append(person)
        return out

    @classmethod
    def empty(cls, num_keypoints: int, box_source: str) -> PoseResult:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0, num_keypoints, 2), np.float32),
            np.zeros((0, num_keypoints), np.float32),
            box_source,
        )


@dataclass
class SegResult:
    """Body-part labels: ``labels`` uint8 (H, W) class ids (class 0 is the background)."""

    labels: np.ndarray

    @property
    def foreground(self) -> np.ndarray:
        """bool (H, W): every pixel not of class 0."""
        return self.labels != 0


@dataclass
class DepthResult:
    """Relative depth: ``depth`` float32 (H, W) (larger = farther, as trained); ``mask`` bool (H, W) the
    foreground it is meant for (the seg foreground when seg ran, else None = the whole image)."""

    depth: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class NormalResult:
    """Surface normals: ``normals`` float32 (3, H, W) unit camera-space vectors; ``mask`` as for depth."""

    normals: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class PointmapResult:
    """Sapiens2 pointmap: ``points`` float32 (3, H, W) metric camera-frame XYZ in metres (canonical points
    divided by the predicted scale; the camera of the resized input); ``mask`` as for depth."""

    points: np.ndarray
    mask: np.ndarray | None = None

    @property
    def depth(self) -> np.ndarray:
        """float32 (H, W) metric depth Z."""
        return self.points[2]


@dataclass
class Prediction:
    """Everything predicted for one image of size (``height``, ``width``); a task not run is None."""

    height: int
    width: int
    pose: PoseResult | None = None
    seg: SegResult | None = None
    depth: DepthResult | None = None
    normal: NormalResult | None = None
    pointmap: PointmapResult | None = None
    extras: dict = field(default_factory=dict)

    def __getitem__(self, task: str):
        return getattr(self, task)
