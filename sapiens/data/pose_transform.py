"""Top-down pose sample transform: one decoded image sample -> one training/eval item per person.

Train pipeline (Sapiens/mmpose recipe): box -> centre/scale (padding 1.25) -> random half-body
(p 0.3, padding 1.5) -> random shift (0.16 x scale, p 0.3) / scale (0.5-1.5) / rotation (+-80 deg,
p 0.6) -> aspect-ratio fix -> UDP affine crop (with an optional horizontal flip composed into the
same warp, p 0.5) -> photometric jitter -> UDP Gaussian heatmaps. Val: the same without any
randomness, one item per GT person or per detection box from a COCO results file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sapiens.codecs.udp_heatmap import UDPHeatmap
from sapiens.data.normalize import IMAGE_MEAN as IMAGE_MEAN_TUPLE
from sapiens.data.normalize import IMAGE_STD as IMAGE_STD_TUPLE
from sapiens.data.normalize import image_to_tensor
from sapiens.data.topdown import (
    bbox_xywh_to_center_scale,
    fix_aspect_ratio,
    hflip_matrix,
    transform_points,
    udp_affine_matrix,
    warp_image,
)
from sapiens.labels import KeypointSet, load_keypoint_set

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "TopDownPoseTransform", "load_person_detections"]

# Re-exported: normalisation itself now runs on the device (``normalize_images``).
IMAGE_MEAN = np.array(IMAGE_MEAN_TUPLE, dtype=np.float32)
IMAGE_STD = np.array(IMAGE_STD_TUPLE, dtype=np.float32)

BBOX_PADDING = 1.25
HALF_BODY_PADDING = 1.5
HALF_BODY_MIN_TOTAL = 9
HALF_BODY_MIN_PART = 2
HALF_BODY_PREFER_UPPER = 0.7


def load_person_detections(path: str | Path, score_thr: float = 0.0) -> dict[int, list[dict]]:
    """Read a COCO results JSON of person boxes, grouped by image id.

    Args:
        path: JSON list of ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"}``.
        score_thr: keep boxes with ``score >= score_thr``; entries whose ``category_id`` is
            not 1 (person) are dropped.

    Returns:
        image_id -> list of ``{"bbox": float32 (4,), "score": float}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bbox_file '{path}' does not exist")
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of COCO detection results")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for i, det in enumerate(entries):
        missing = {"image_id", "bbox", "score"} - set(det)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks keys {sorted(missing)}")
        if det.get("category_id", 1) != 1 or det["score"] < score_thr:
            continue
        by_image[int(det["image_id"])].append(
            {"bbox": np.asarray(det["bbox"], dtype=np.float32), "score": float(det["score"])}
        )
    return dict(by_image)


def _truncnorm(rng: np.random.Generator, size: int) -> np.ndarray:
    """Standard normal samples truncated to [-1, 1] (resampling, not clipping)."""
    out = rng.standard_normal(size)
    bad = np.abs(out) > 1
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 1
    return out


class TopDownPoseTransform:
    """Turn a decoded pose sample into a list of per-person crops with heatmap targets.

    Args:
        keypoint_set: label-space name or YAML path (see :mod:`sapiens.labels`), or a loaded set.
        input_size: network input (H, W), e.g. (1024, 768) or (64, 48).
        heatmap_stride: input / heatmap size ratio (4 in Sapiens).
        sigma: heatmap Gaussian sigma in heatmap pixels (6 at 256x192; scale it for small inputs,
            e.g. 1.5 for 16x12 heatmaps).
        train: enable augmentation and skip persons with too few labels.
        flip_prob, half_body_prob, shift_factor, shift_prob, scale_range, rotate, rotate_prob:
            augmentation settings (train only); ``rotate`` is the max angle in degrees.
        photometric: brightness/contrast/saturation/hue jitter (train only).
        blur_prob, median_blur_prob: box / median blur with an odd kernel of 3-7 px (train only;
            the published recipe's Albumentations ``Blur`` and ``MedianBlur``, p 0.1 each).
        coarse_dropout_prob, coarse_dropout_size: one hole of (0.2-0.4 H) x (0.2-0.4 W) filled with
            zeros, p 1.0 (Albumentations ``CoarseDropout`` as published); targets are unchanged.
        bbox_file: val only; COCO results JSON of person detections used instead of GT boxes.
        bbox_score_thr: minimum detection score kept from ``bbox_file``.
        min_keypoints: persons with fewer labelled keypoints (v > 0) are skipped (val: at least 1).
        seed: optional base seed; by default randomness comes from ``torch.initial_seed()``,
            which differs per DataLoader worker.
    """

    def __init__(
        self,
        keypoint_set: str | Path | KeypointSet,
        input_size: Sequence[int] = (1024, 768),
        heatmap_stride: int = 4,
        sigma: float = 6.0,
        train: bool = True,
        flip_prob: float = 0.5,
        half_body_prob: float = 0.3,
        shift_factor: float = 0.16,
        shift_prob: float = 0.3,
        scale_range: Sequence[float] = (0.5, 1.5),
        rotate: float = 80.0,
        rotate_prob: float = 0.6,
        photometric: bool = True,
        blur_prob: float = 0.1,
        median_blur_prob: float = 0.1,
        coarse_dropout_prob: float = 1.0,
        coarse_dropout_size: Sequence[float] = (0.2, 0.4),
        bbox_file: str | None = None,
        bbox_score_thr: float = 0.0,
        min_keypoints: int = 1,
        seed: int | None = None,
    ) -> None:
        self.kset = keypoint_set if isinstance(keypoint_set, KeypointSet) else load_keypoint_set(keypoint_set)
        if len(input_size) != 2:
            raise ValueError(f"input_size must be (H, W), got {input_size}")
        self.input_h, self.input_w = (int(v) for v in input_size)
        if self.input_h % heatmap_stride or self.input_w % heatmap_stride:
            raise ValueError(
                f"input_size {tuple(input_size)} must be divisible by heatmap_stride {heatmap_stride}"
            )
        self.heatmap_size = (self.input_w // heatmap_stride, self.input_h // heatmap_stride)
        self.codec = UDPHeatmap((self.input_w, self.input_h), self.heatmap_size, sigma)
        self.aspect_ratio = self.input_w / self.input_h
        self.train = train
        self.flip_prob = flip_prob
        self.half_body_prob = half_body_prob
        self.shift_factor = shift_factor
        self.shift_prob = shift_prob
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotate = rotate
        self.rotate_prob = rotate_prob
        self.photometric = photometric
        self.blur_prob, self.median_blur_prob = float(blur_prob), float(median_blur_prob)
        self.coarse_dropout_prob = float(coarse_dropout_prob)
        lo, hi = (float(v) for v in coarse_dropout_size)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"coarse_dropout_size must satisfy 0 < lo <= hi <= 1, got {coarse_dropout_size}")
        self.coarse_dropout_size = (lo, hi)
        self.min_keypoints = int(min_keypoints)
        if bbox_file is not None and train:
            raise ValueError("bbox_file is only used in val mode (train=False)")
        self.detections = load_person_detections(bbox_file, bbox_score_thr) if bbox_file is not None else None
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    @property
    def rng(self) -> np.random.Generator:
        """Per-process generator, created lazily so each DataLoader worker draws differently."""
        if self._rng is None or self._rng_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            base = torch.initial_seed() if self.seed is None else self.seed
            worker = 0 if info is None else info.id
            self._rng = np.random.default_rng([base % 2**63, worker])
            self._rng_pid = os.getpid()
        return self._rng

    # ------------------------------------------------------------------ instances
    def _instances(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Boxes (with keypoints when GT) to crop, after filtering."""
        k = self.kset.num_keypoints
        h, w = sample["image"].shape[:2]
        if self.detections is not None:
            dets = self.detections.get(int(sample["image_id"]), [])
            return [
                {
                    "bbox": d["bbox"],
                    "keypoints": np.zeros((k, 3), np.float32),
                    "score": d["score"],
                    "area": float(d["bbox"][2] * d["bbox"][3]),
                }
                for d in dets
                if d["bbox"][2] > 0 and d["bbox"][3] > 0
            ]
        needed = self.min_keypoints if self.train else 1
        out = []
        for p in sample.get("persons", []):
            kpts = np.asarray(p["keypoints"], dtype=np.float32).reshape(-1, 3)
            if kpts.shape[0] != k:
                raise ValueError(
                    f"sample '{sample.get('key', sample.get('image_id'))}': person has "
                    f"{kpts.shape[0]} keypoints but keypoint set '{self.kset.name}' has {k}"
                )
            if p.get("iscrowd", 0) or int((kpts[:, 2] > 0).sum()) < needed:
                continue
            x, y, bw, bh = (float(v) for v in p["bbox"])
            # Clip the box to the image like the reference loader; drop degenerate boxes.
            x1, y1 = np.clip([x, y], 0, [w - 1, h - 1])
            x2, y2 = np.clip([x + bw, y + bh], 0, [w - 1, h - 1])
            if x2 <= x1 or y2 <= y1:
                continue
            bbox = np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float32)
            out.append({"bbox": bbox, "keypoints": kpts, "score": 1.0, "area": float(p["area"])})
        return out

    # ------------------------------------------------------------------ augmentation
    def _half_body(self, kpts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Centre/scale of a random upper- or lower-body box, or None when not applied."""
        groups = self.kset.groups
        if "upper_body" not in groups or "lower_body" not in groups:
            return None
        labelled = kpts[:, 2] > 0
        if labelled.sum() < HALF_BODY_MIN_TOTAL or self.rng.random() > self.half_body_prob:
            return None
        upper = [i for i in groups["upper_body"] if labelled[i]]
        lower = [i for i in groups["lower_body"] if labelled[i]]
        prefer_upper = self.rng.random() < HALF_BODY_PREFER_UPPER
        if len(upper) < HALF_BODY_MIN_PART and len(lower) < HALF_BODY_MIN_PART:
            return None
        if len(lower) < HALF_BODY_MIN_PART:
            ids = upper
        elif len(upper) < HALF_BODY_MIN_PART:
            ids = lower
        else:
            ids = upper if prefer_upper else lower
        pts = kpts[ids, :2]
        center = pts.mean(axis=0)
        scale = (pts.max(axis=0) - pts.min(axis=0)) * HALF_BODY_PADDING
        return center.astype(np.float32), scale.astype(np.float32)

    def _random_box(self, center: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, ...]:
        """Random shift / scale / rotation of the box (truncated-normal draws)."""
        shift, s, r = (
            _truncnorm(self.rng, 2),
            _truncnorm(self.rng, 1)[0],
            _truncnorm(self.rng, 1)[0],
        )
        if self.rng.random() < self.shift_prob:
            center = center + shift * self.shift_factor * scale
        lo, hi = self.scale_range
        scale = scale * (s * (hi - lo) / 2 + (hi + lo) / 2)
        rot = r * self.rotate if self.rng.random() < self.rotate_prob else 0.0
        return center.astype(np.float32), scale.astype(np.float32), float(rot)

    def _photometric(self, img: np.ndarray) -> np.ndarray:
        """Brightness (+-32), contrast/saturation (x0.5-1.5), hue (+-18) jitter, p 0.5 each.

        Args:
            img: uint8 (H, W, 3) RGB. Returns uint8 (H, W, 3).
        """
        rng = self.rng
        out = img.astype(np.float32)
        if rng.random() < 0.5:
            out += rng.uniform(-32, 32)
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            out *= rng.uniform(0.5, 1.5)
        do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
        if do_sat or do_hue:
            hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            hsv = hsv.astype(np.float32)
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
            if do_hue:
                hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19)) % 180  # OpenCV hue is 0..179
            out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        if not contrast_first and rng.random() < 0.5:
            out *= rng.uniform(0.5, 1.5)
        return np.clip(out, 0, 255).astype(np.uint8)

    def _degrade(self, img: np.ndarray) -> np.ndarray:
        """Blur (p ``blur_prob``), median blur (p ``median_blur_prob``), then one zero-filled hole
        (p ``coarse_dropout_prob``), in the published order. uint8 (H, W, 3) -> same."""
        rng = self.rng
        if rng.random() < self.blur_prob:
            k = int(rng.choice((3, 5, 7)))
            img = cv2.blur(img, (k, k))
        if rng.random() < self.median_blur_prob:
            img = cv2.medianBlur(img, int(rng.choice((3, 5, 7))))
        if rng.random() < self.coarse_dropout_prob:
            h, w = img.shape[:2]
            lo, hi = self.coarse_dropout_size
            hole_h = int(rng.integers(max(1, round(lo * h)), max(1, round(hi * h)) + 1))
            hole_w = int(rng.integers(max(1, round(lo * w)), max(1, round(hi * w)) + 1))
            top, left = int(rng.integers(0, h - hole_h + 1)), int(rng.integers(0, w - hole_w + 1))
            img = img.copy() if not img.flags.writeable else img
            img[top : top + hole_h, left : left + hole_w] = 0
        return img

    # ------------------------------------------------------------------ main entry
    def __call__(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Crop every person of a decoded pose sample.

        Args:
            sample: ``{"image": uint8 (H, W, 3) RGB, "key", "image_id", "width", "height",
                "persons": [{"id", "bbox" (4,) xywh, "area", "keypoints" (K, 3)}]}``.

        Returns:
            One dict per kept person: ``image`` uint8 (3, H_in, W_in) RGB (normalised later,
            on the device, by ``normalize_images``),
            ``heatmaps`` float32 (K, h, w), ``target_weight`` float32 (K,), ``center``
            float32 (2,), ``scale`` float32 (2,) (image pixels, un-flipped box),
            ``image_id`` int, ``bbox_score`` float, ``area`` float. With detection boxes the
            targets are zero (no GT is matched to a detection).
        """
        image = sample.get("image")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"sample '{sample.get('key')}': 'image' must be a uint8 (H, W, 3) RGB array, "
                f"got {type(image).__name__} {getattr(image, 'shape', '')}"
            )
        items = []
        for inst in self._instances(sample):
            items.append(self._crop_person(image, inst, int(sample["image_id"])))
        return items

    def _crop_person(self, image: np.ndarray, inst: dict[str, Any], image_id: int) -> dict:
        kpts = inst["keypoints"]
        center, scale = bbox_xywh_to_center_scale(inst["bbox"], None, BBOX_PADDING)
        rot, flip = 0.0, False
        if self.train:
            half = self._half_body(kpts)
            if half is not None and np.all(half[1] > 0):
                center, scale = half
            center, scale, rot = self._random_box(center, scale)
            flip = self.rng.random() < self.flip_prob
        scale = fix_aspect_ratio(scale, self.aspect_ratio)
        matrix = udp_affine_matrix(center, scale, rot, (self.input_w, self.input_h))
        if flip:
            # Mirroring the crop is the same as mirroring the image before cropping.
            matrix = hflip_matrix(matrix, self.input_w)
        crop = warp_image(image, matrix, (self.input_w, self.input_h))
        points = transform_points(kpts[:, :2], matrix)
        visible = (kpts[:, 2] > 0).astype(np.float32)
        if flip:
            points, visible = points[self.kset.flip_index], visible[self.kset.flip_index]
        if self.train and self.photometric:
            crop = self._photometric(crop)
        if self.train:
            crop = self._degrade(crop)
        heatmaps, weights = self.codec.encode(points, visible)
        return {
            "image": image_to_tensor(crop),
            "heatmaps": torch.from_numpy(heatmaps),
            "target_weight": torch.from_numpy(weights),
            "center": torch.from_numpy(center.astype(np.float32)),
            "scale": torch.from_numpy(scale.astype(np.float32)),
            "image_id": image_id,
            "bbox_score": float(inst["score"]),
            "area": float(inst["area"]),
        }
