"""The Python API of inference: :class:`Predictor` runs one or several task models on numpy images.

    from sapiens.predict import Predictor
    predictor = Predictor(["seg.pth", "pose.ckpt"], device="auto")
    prediction = predictor(image)                 # (H, W, 3) uint8 RGB -> Prediction
    prediction.pose.keypoints, prediction.seg.labels
    picture = predictor.render(image, prediction)

Preprocessing is validation's: dense models see the image resized to their input (bilinear, no aspect
kept, as ``DenseTransform`` does in validation); pose models see 1.25-padded person crops at their own
aspect ratio through the UDP affine of ``TopDownPoseTransform``. Decoding and pictures are the task
objects' own (``task.predict`` with the flip test, ``task.decode``, ``task.overlay``), shared with
validation. Dense models run before pose, so that a seg foreground can give pose its boxes and depth,
normals and pointmaps their mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from sapiens.data.pose_transform import BBOX_PADDING
from sapiens.data.topdown import bbox_xywh_to_center_scale, udp_affine_matrix, warp_image
from sapiens.predict.boxes import boxes_from_foreground, full_image_box, load_person_detections
from sapiens.predict.results import (
    DepthResult,
    NormalResult,
    PointmapResult,
    PoseResult,
    Prediction,
    SegResult,
)
from sapiens.predict.runners import Runner, load_runner
from sapiens.predict.tracking import PoseTracker
from sapiens.visualize import tile

TASK_ORDER = ("seg", "depth", "normal", "pointmap", "pose")
STAGES = ("decode", "preprocess", "model", "postprocess", "write")
BOX_MODES = ("auto", "full", "seg")


class StageTimer:
    """Seconds spent per stage (decode, preprocess, model, postprocess, write), summed over calls."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync: torch.device | None = None

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if stage == "model" and self.sync is not None and self.sync.type == "cuda":
                torch.cuda.synchronize(self.sync)  # asynchronous kernels count where they run
            self.seconds[stage] += time.perf_counter() - start


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file (read in 16 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Predictor:
    """One or several task models over the same images.

    Args:
        checkpoint: one model file or a list (one per task): our ``.ckpt``, a published ``.pth``, a
            ZeRO-converted file, an ``.onnx`` or a ``.pt2`` export.
        task: the task expected of each file (None: whatever it holds), a name or a list.
        device: ``auto`` (cuda, then mps, then cpu) or a torch device string.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        batch_size: images (dense) or person crops (pose) per forward pass.
        compile: ``torch.compile`` the checkpoint models.
        flip_test: pose: average with the mirrored crop, flipped back with left and right swapped.
        boxes: ``auto`` (detections file entry, seg foreground, previous frame, full image, in that
            order), ``full``, ``seg``, or the path of a COCO detections JSON (then ``auto`` for images
            it does not list).
        box_score_thr: detections below this score are dropped.
        kpt_thr: keypoints above this score are drawn and make a video's next boxes.
        overrides: ``keypoint_set``, ``class_list``, ``patch_padding``, ``image_size``, ``num_heads``
            for files that do not say.
    """

    def __init__(
        self,
        checkpoint: str | Path | Sequence[str | Path],
        task: str | Sequence[str | None] | None = None,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 8,
        compile: bool = False,
        flip_test: bool = True,
        boxes: str = "auto",
        box_score_thr: float = 0.3,
        kpt_thr: float = 0.3,
        overrides: dict | None = None,
    ):
        paths = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
        if not paths:
            raise ValueError("checkpoint: no model file given")
        tasks = list(task) if isinstance(task, list | tuple) else [task] * len(paths)
        if len(tasks) != len(paths):
            raise ValueError(f"task: {len(tasks)} tasks for {len(paths)} checkpoints")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        self.runners: dict[str, Runner] = {}
        for path, want in zip(paths, tasks, strict=True):
            runner = load_runner(path, want, device, precision, compile, flip_test, overrides)
            name = runner.spec.task
            if name in self.runners:
                raise ValueError(
                    f"{path} and {self.runners[name].path} are both {name} models; give one per task"
                )
            self.runners[name] = runner
        self.runners = {t: self.runners[t] for t in TASK_ORDER if t in self.runners}
        self.device = next(iter(self.runners.values())).device
        self.batch_size, self.precision, self.flip_test = batch_size, precision, flip_test
        self.kpt_thr, self.box_score_thr = kpt_thr, box_score_thr
        self.detections: dict[int, list[dict]] | None = None
        self.box_mode = boxes
        if boxes not in BOX_MODES:
            # Every listed image counts as listed, even when none of its boxes passes box_score_thr.
            self.detections = load_person_detections(boxes, 0.0)
            self.box_mode = "auto"
        if self.box_mode == "seg" and "seg" not in self.runners:
            raise ValueError("boxes=seg needs a seg checkpoint in the same call")
        self.timer = StageTimer()
        self.timer.sync = self.device

    @property
    def tasks(self) -> list[str]:
        """The tasks run, in the order they run."""
        return list(self.runners)

    # ------------------------------------------------------------------ API
    def __call__(self, image: np.ndarray, boxes: np.ndarray | None = None) -> Prediction:
        """Predict every task for one (H, W, 3) uint8 RGB image; ``boxes`` (N, 4) [x, y, w, h] for pose."""
        return self.predict([image], boxes=None if boxes is None else [boxes])[0]

    def predict(
        self,
        images: Sequence[np.ndarray],
        image_ids: Sequence[int] | None = None,
        boxes: Sequence[np.ndarray | None] | None = None,
        tracker: PoseTracker | None = None,
        times: Sequence[float] | None = None,
    ) -> list[Prediction]:
        """Predict a batch of (H, W, 3) uint8 RGB images (any sizes).

        Args:
            image_ids: COCO ids used to look images up in the detections file.
            boxes: per image, person boxes (N, 4) or (N, 5) with scores, or None for automatic boxes.
            tracker: consecutive video frames: track ids, previous-frame boxes, smoothing.
            times: frame times in seconds (for the tracker's smoothing).
        """
        for image in images:
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
                raise ValueError(
                    f"images must be (H, W, 3) uint8 RGB arrays, got {getattr(image, 'shape', image)}"
                )
        out = [Prediction(int(im.shape[0]), int(im.shape[1])) for im in images]
        for name, runner in self.runners.items():
            if name == "pose":
                self._pose(runner, images, out, image_ids, boxes, tracker, times)
            else:
                self._dense(runner, images, out)
        return out

    # ------------------------------------------------------------------ dense tasks
    def _dense(self, runner: Runner, images: Sequence[np.ndarray], out: list[Prediction]) -> None:
        h, w = runner.spec.image_size
        name = runner.spec.task
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            with self.timer("preprocess"):
                resized = [
                    im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
                    for im in chunk
                ]
                batch = runner.normalize(torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2))
            with self.timer("model"):
                outputs = runner(batch)
            with self.timer("postprocess"):
                for i, image in enumerate(chunk):
                    pred = out[start + i]
                    decoded = runner.task.decode(runner.select(outputs, i), image.shape[:2])[0]
                    mask = pred.seg.foreground if pred.seg is not None else None
                    if name == "seg":
                        dtype = np.uint8 if len(runner.spec.label_names()) <= 256 else np.int32
                        pred.seg = SegResult(decoded.to(torch.int32).cpu().numpy().astype(dtype))
                    elif name == "depth":
                        pred.depth = DepthResult(decoded.cpu().numpy(), mask)
                    elif name == "pointmap":
                        pred.pointmap = PointmapResult(decoded.cpu().numpy(), mask)
                    else:
                        pred.normal = NormalResult(decoded.cpu().numpy(), mask)

    # ------------------------------------------------------------------ pose
    def _boxes(self, index: int, image: np.ndarray, pred: Prediction, image_ids, boxes, tracker):
        """(boxes (N, 4), scores (N,), source) for one image; boxes without area are dropped."""
        found, scores, source = self._box_source(index, image, pred, image_ids, boxes, tracker)
        keep = (found[:, 2] > 0) & (found[:, 3] > 0)
        return found[keep], scores[keep], source

    def _box_source(self, index: int, image: np.ndarray, pred: Prediction, image_ids, boxes, tracker):
        """Boxes by the preference order of the class docstring."""
        given = None if boxes is None else boxes[index]
        if given is not None:
            given = np.asarray(given, np.float32)
            given = given.reshape(-1, given.shape[-1]) if given.size else np.zeros((0, 4), np.float32)
            scores = given[:, 4] if given.shape[1] > 4 else np.ones(len(given), np.float32)
            return given[:, :4], scores, "given"
        if self.box_mode == "auto" and self.detections is not None and image_ids is not None:
            dets = self.detections.get(int(image_ids[index]))
            if dets is not None:
                dets = [d for d in dets if d["score"] >= self.box_score_thr]
                found = np.asarray([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
                return found, np.asarray([d["score"] for d in dets], np.float32).reshape(-1), "file"
        if self.box_mode in ("auto", "seg") and pred.seg is not None:
            found = boxes_from_foreground(pred.seg.foreground)
            return found, np.ones(len(found), np.float32), "seg"
        if self.box_mode == "auto" and tracker is not None:
            found = tracker.boxes()
            if found is not None:
                return found, np.ones(len(found), np.float32), "track"
        return full_image_box(*image.shape[:2]), np.ones(1, np.float32), "full"

    def _pose(self, runner, images, out, image_ids, boxes, tracker, times) -> None:
        # With a tracker and no other box source, frame t's boxes come from frame t-1's keypoints: one
        # frame at a time. Otherwise all crops of the batch go through the model together.
        tracked = tracker is not None and self.box_mode == "auto" and "seg" not in self.runners
        groups = [[i] for i in range(len(images))] if tracked else [list(range(len(images)))]
        for group in groups:
            crops, owners, centers, scales, found = [], [], [], [], {}
            with self.timer("preprocess"):
                for i in group:
                    found[i] = self._boxes(i, images[i], out[i], image_ids, boxes, tracker)
                    for box in found[i][0]:
                        crop, center, scale = self._crop(runner, images[i], box)
                        crops.append(crop)
                        owners.append(i)
                        centers.append(center)
                        scales.append(scale)
            keypoints = self._pose_crops(runner, crops, centers, scales)
            with self.timer("postprocess"):
                owners_arr = np.asarray(owners, np.int64)
                for i in group:
                    mine = owners_arr == i
                    box, score, source = found[i]
                    kpts = keypoints[mine]
                    result = PoseResult(box, score, kpts[..., :2].copy(), kpts[..., 2].copy(), source)
                    if tracker is not None:
                        result = tracker.update(result, times[i] if times is not None else float(i))
                    out[i].pose = result

    @staticmethod
    def _crop(runner: Runner, image: np.ndarray, box: np.ndarray):
        """UDP crop of a 1.25-padded box at the model's aspect ratio (validation's geometry)."""
        h, w = runner.spec.image_size
        center, scale = bbox_xywh_to_center_scale(box, aspect_ratio=w / h, padding=BBOX_PADDING)
        crop = warp_image(image, udp_affine_matrix(center, scale, 0.0, (w, h)), (w, h))
        return crop, center, scale

    def _pose_crops(self, runner: Runner, crops, centers, scales) -> np.ndarray:
        """Keypoints (N, K, 3) in image pixels of the crops (the flip test is in ``task.predict``)."""
        k = runner.task.kset.num_keypoints
        results = [np.zeros((0, k, 3), np.float32)]
        for start in range(0, len(crops), self.batch_size):
            end = start + self.batch_size
            with self.timer("preprocess"):
                x = runner.normalize(torch.from_numpy(np.stack(crops[start:end])).permute(0, 3, 1, 2))
            with self.timer("model"):
                heatmaps = runner.task.predict(runner, {"image": x})
            with self.timer("postprocess"):
                geometry = {
                    "center": torch.from_numpy(np.stack(centers[start:end])),
                    "scale": torch.from_numpy(np.stack(scales[start:end])),
                }
                results.append(runner.task.decode(heatmaps, geometry).astype(np.float32))
        return np.concatenate(results)

    # ------------------------------------------------------------------ pictures and description
    def render(
        self,
        image: np.ndarray,
        prediction: Prediction,
        layout: str = "side_by_side",
        depth_range: tuple[float, float] | None = None,
        alpha: float = 0.6,
    ) -> np.ndarray:
        """One (H', W', 3) uint8 picture: a panel per task (seg palette, depth / pointmap Z and normal
        colours over their foreground, pose skeletons and boxes); ``side_by_side`` puts the image first,
        ``blend`` shows the panels only."""
        if layout not in ("side_by_side", "blend"):
            raise ValueError(f"layout={layout}: expected side_by_side or blend")
        panels = [image] if layout == "side_by_side" else []
        for name, runner in self.runners.items():
            result, task = prediction[name], runner.task
            if result is None:
                continue
            if name == "seg":
                panels.append(task.overlay(image, result.labels, alpha))
            elif name == "depth":
                panels.append(task.overlay(image, result.depth, result.mask, depth_range))
            elif name == "pointmap":  # metres: the video range is its own unless no relative depth ran
                value_range = depth_range if "depth" not in self.runners else None
                panels.append(task.overlay(image, result.points, result.mask, value_range))
            elif name == "normal":
                panels.append(task.overlay(image, result.normals, result.mask))
            else:
                kpts = np.concatenate([result.keypoints, result.keypoint_scores[..., None]], -1)
                panels.append(task.overlay(image, kpts, result.boxes, self.kpt_thr))
        return tile([panels], gap=4) if len(panels) > 1 else panels[0]

    def describe(self, hashes: bool = True) -> dict:
        """JSON-able description of the models for ``meta.json``."""
        models = {}
        for name, runner in self.runners.items():
            spec = runner.spec
            models[name] = {
                "file": runner.path,
                "format": runner.kind,
                "sha256": file_sha256(runner.path) if hashes else None,
                "spec_source": spec.source,
                "model": spec.model_name,
                "backbone": spec.backbone,
                "input_size_hw": list(spec.image_size),
                "patch_padding": spec.patch_padding,
                "labels": spec.label_names(),
                "label_space": (spec.head.get("keypoint_set") or spec.head.get("class_list") or {}).get(
                    "name"
                ),
            }
        return {
            "models": models,
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "flip_test": self.flip_test,
            "boxes": self.box_mode if self.detections is None else "file",
            "preprocessing": {
                "mean": list(next(iter(self.runners.values())).spec.mean),
                "std": list(next(iter(self.runners.values())).spec.std),
                "dense": "bilinear resize of the whole image to the input size (aspect not kept)",
                "pose": f"box padded by {BBOX_PADDING}, grown to the input aspect ratio, UDP affine crop",
            },
        }
