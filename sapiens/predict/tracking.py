"""Persons across video frames: greedy IoU track ids, previous-frame boxes, One-Euro smoothing.

The tracker gives the next frame its boxes from this frame's keypoints (when no better box source
runs) and keeps one One-Euro filter per track, over all (x, y) of its keypoints at once. A track not
matched in a frame ends, and its filter with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sapiens.predict.boxes import boxes_from_keypoints
from sapiens.predict.results import PoseResult

# Boxes of the same person in consecutive frames overlap at least this much.
MATCH_IOU = 0.3


class OneEuroFilter:
    """One-Euro filter (Casiez et al. 2012) over an array of values sampled at times ``t`` (seconds).

    The cut-off frequency grows with the speed: ``min_cutoff + beta * |dx/dt|``, so slow motion is smoothed
    strongly (no jitter) and fast motion little (no lag). ``d_cutoff`` smooths the speed estimate.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t: float | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filtered ``x`` (any shape, same as the first call) at time ``t``."""
        x = np.asarray(x, np.float64)
        if self.x is None or self.t is None or t <= self.t:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.astype(np.float32)
        dt = t - self.t
        a_d = self._alpha(self.d_cutoff, dt)
        self.dx = a_d * (x - self.x) / dt + (1 - a_d) * self.dx
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self.dx), dt)
        self.x = a * x + (1 - a) * self.x
        self.t = t
        return self.x.astype(np.float32)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (M, 4) [x, y, w, h] boxes -> (N, M)."""
    a1, a2 = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
    b1, b2 = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
    inter = np.clip(np.minimum(a2, b2) - np.maximum(a1, b1), 0, None).prod(-1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - inter
    return inter / np.maximum(union, 1e-9)


@dataclass
class _Track:
    id: int
    box: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray
    smoother: OneEuroFilter | None = field(default=None)


class PoseTracker:
    """Track ids, next-frame boxes and optional smoothing for the persons of one video.

    Args:
        kpt_thr: keypoints scoring above it make the next frame's box.
        smoothing: One-Euro parameters ``{"min_cutoff", "beta", "d_cutoff"}``, or None for none.
    """

    def __init__(self, kpt_thr: float = 0.3, smoothing: dict | None = None):
        self.kpt_thr = kpt_thr
        self.smoothing = smoothing
        self.tracks: list[_Track] = []
        self.next_id = 0

    def boxes(self) -> np.ndarray | None:
        """float32 (N, 4) boxes from the last frame's keypoints, or None when no person is tracked."""
        if not self.tracks:
            return None
        kpts = np.stack([t.keypoints for t in self.tracks])
        scores = np.stack([t.scores for t in self.tracks])
        boxes, _ = boxes_from_keypoints(kpts, scores, self.kpt_thr)
        return boxes if boxes.shape[0] else None

    def update(self, result: PoseResult, t: float) -> PoseResult:
        """Give ``result``'s persons track ids (greedy by IoU with the last frame's boxes), smooth their
        keypoints when asked; returns the updated result (same object)."""
        n = result.num_persons
        ids = np.full(n, -1, np.int64)
        previous = {i: track for i, track in enumerate(self.tracks)}
        if n and previous:
            iou = iou_matrix(result.boxes, np.stack([track.box for track in self.tracks]))
            for flat in np.argsort(-iou, axis=None):
                i, j = divmod(int(flat), iou.shape[1])
                if iou[i, j] < MATCH_IOU:
                    break
                if ids[i] < 0 and j in previous:
                    ids[i] = previous.pop(j).id
        tracks = {track.id: track for track in self.tracks}
        updated = []
        for i in range(n):
            if ids[i] < 0:
                ids[i] = self.next_id
                self.next_id += 1
            track = tracks.get(int(ids[i])) or _Track(int(ids[i]), result.boxes[i], result.keypoints[i], None)
            if self.smoothing is not None:
                track.smoother = track.smoother or OneEuroFilter(**self.smoothing)
                result.keypoints[i] = track.smoother(result.keypoints[i], t)
            track.box, track.keypoints, track.scores = (
                result.boxes[i],
                result.keypoints[i],
                result.keypoint_scores[i],
            )
            updated.append(track)
        self.tracks = updated
        result.track_ids = ids
        return result
