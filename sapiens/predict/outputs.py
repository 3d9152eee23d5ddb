"""What ``predict`` writes into its output folder.

    <output_dir>/meta.json                 models (file, sha256, spec), preprocessing, labels, torch version,
                                           timings per stage, counts, skipped inputs
    vis/<name>.jpg | vis/<video>.mp4       overlays (side by side with the image, or the panels only)
    pose/<name>.json                       {"image", "image_id", "width", "height", "box_source",
                                            "instances": [{bbox, bbox_score, keypoints, keypoint_scores}]}
    pose/<video>.json                      {"video", "fps", "frames": [{"frame_index", "time", "instances"}]}
    pose_results_coco.json                 COCO keypoint results of the still images (pycocotools loadRes)
    seg/<name>.png                         uint8 class ids at the source resolution
    depth/<name>.npy                       float16 (H, W) relative depth, NaN outside the seg foreground
    normal/<name>.npz                      ``normal`` float16 (H, W, 3) unit vectors, ``mask`` bool (H, W)
    pointmap/<name>.npy                    float16 (H, W, 3) metric XYZ in metres, NaN outside the seg
                                           foreground (the overlay shows Z colour-mapped, near = bright)

``<name>`` is the image's path relative to the source folder without suffix (sub-folders are kept);
a video's raw arrays go to ``<task>/<video>/<frame index:06d>.<ext>``.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import cv2
import numpy as np
import torch

from sapiens.metrics.keypoint_ap import KeypointAP
from sapiens.predict.predictor import Predictor
from sapiens.predict.results import Prediction
from sapiens.predict.sources import Frame
from sapiens.predict.video import VideoWriter

log = logging.getLogger(__name__)


def next_run_dir(root: str | Path = "runs/predict") -> Path:
    """``root/<n>`` with n one more than the largest numbered folder there (1 for the first)."""
    root = Path(root)
    numbers = (
        [int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    )
    return root / str(max(numbers, default=0) + 1)


class OutputWriter:
    """Writes overlays, raw arrays and JSON per frame, and the run's COCO results and ``meta.json``.

    Args:
        out_dir: the output folder.
        predictor: the models (their tasks draw the overlays).
        layout: ``side_by_side`` or ``blend`` (see :meth:`Predictor.render`).
        save_overlays, save_raw, save_json: which outputs to write.
        jpeg_quality: of the overlay JPEGs.
        video_codec: ``auto`` (H.264 through PyAV when installed, else mp4v), ``h264``, ``mp4v``...
        vid_stride: every how many source frames one was predicted (the output frame rate is divided by it).
    """

    def __init__(
        self,
        out_dir: str | Path,
        predictor: Predictor,
        layout: str = "side_by_side",
        save_overlays: bool = True,
        save_raw: bool = True,
        save_json: bool = True,
        jpeg_quality: int = 90,
        video_codec: str = "auto",
        vid_stride: int = 1,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.predictor, self.layout = predictor, layout
        self.save_overlays, self.save_raw, self.save_json = save_overlays, save_raw, save_json
        self.jpeg_quality, self.video_codec, self.vid_stride = jpeg_quality, video_codec, max(1, vid_stride)
        self.videos: dict[str, VideoWriter] = {}
        self.video_json: dict[str, dict] = {}
        self.written = 0
        self.skipped: list[str] = []
        pose = predictor.runners.get("pose")
        self.coco = KeypointAP(pose.task.kset) if pose is not None else None

    # ------------------------------------------------------------------ per frame
    def write(
        self, frame: Frame, prediction: Prediction, depth_range: tuple[float, float] | None = None
    ) -> None:
        """Write every output of one predicted frame."""
        image = frame.image
        video = frame.video is not None
        stem = f"{frame.name}/{frame.index:06d}" if video else frame.name
        if self.save_overlays:
            picture = self.predictor.render(image, prediction, self.layout, depth_range)
            if video:
                self._video_writer(frame).write(picture)
            else:
                self._imwrite(
                    self.out_dir / "vis" / f"{stem}.jpg",
                    picture,
                    [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality],
                )
        if self.save_raw:
            self._write_raw(stem, prediction)
        if prediction.pose is not None:
            self._write_pose(frame, prediction)
        self.written += 1

    def skip(self, frame: Frame) -> None:
        """Count an unreadable image or frame."""
        self.skipped.append(frame.error or f"{frame.name}: unreadable")
        log.warning("skipped: %s", self.skipped[-1])

    def _imwrite(self, path: Path, rgb: np.ndarray, params: list[int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"could not write {path}")

    def _video_writer(self, frame: Frame) -> VideoWriter:
        writer = self.videos.get(frame.name)
        if writer is None:
            path = self.out_dir / "vis" / f"{frame.name}.mp4"
            writer = VideoWriter(path, frame.video.fps / self.vid_stride, self.video_codec)
            self.videos[frame.name] = writer
        return writer

    def _write_raw(self, stem: str, prediction: Prediction) -> None:
        if prediction.seg is not None:
            path = self.out_dir / "seg" / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), prediction.seg.labels, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise OSError(f"could not write {path}")
        if prediction.depth is not None:
            depth = prediction.depth.depth.astype(np.float16)
            if prediction.depth.mask is not None:
                depth[~prediction.depth.mask] = np.nan
            path = self.out_dir / "depth" / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, depth)
        if prediction.pointmap is not None:
            points = prediction.pointmap.points.transpose(1, 2, 0).astype(np.float16)
            if prediction.pointmap.mask is not None:
                points[~prediction.pointmap.mask] = np.nan
            path = self.out_dir / "pointmap" / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, points)
        if prediction.normal is not None:
            result = prediction.normal
            mask = result.mask if result.mask is not None else np.ones(result.normals.shape[1:], bool)
            normals = result.normals.transpose(1, 2, 0).astype(np.float16)
            normals[~mask] = 0
            path = self.out_dir / "normal" / f"{stem}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, normal=normals, mask=mask)

    def _write_pose(self, frame: Frame, prediction: Prediction) -> None:
        pose = prediction.pose
        if frame.video is not None:
            record = self.video_json.setdefault(
                frame.name,
                {"video": frame.video.path, "fps": frame.video.fps / self.vid_stride, "frames": []},
            )
            record["frames"].append(
                {
                    "frame_index": frame.index,
                    "time": round(frame.time, 4),
                    "box_source": pose.box_source,
                    "instances": pose.instances(),
                }
            )
            return
        if self.save_json:
            path = self.out_dir / "pose" / f"{frame.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {
                        "image": frame.name,
                        "image_id": frame.image_id,
                        "width": prediction.width,
                        "height": prediction.height,
                        "box_source": pose.box_source,
                        "instances": pose.instances(),
                    }
                )
            )
        if pose.num_persons:
            keypoints = np.concatenate([pose.keypoints, pose.keypoint_scores[..., None]], -1)
            areas = pose.boxes[:, 2] * pose.boxes[:, 3]
            self.coco.add_predictions(
                [frame.image_id] * pose.num_persons, keypoints, pose.box_scores, areas, pose.boxes
            )

    # ------------------------------------------------------------------ end of run
    def close(self, meta: dict) -> dict:
        """Finish videos, write the COCO results and ``meta.json``; returns what ``meta.json`` holds."""
        for writer in self.videos.values():
            writer.close()
        for name, record in self.video_json.items():
            path = self.out_dir / "pose" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
        if self.coco is not None and self.save_json:
            results = self.coco.scored_results(with_ground_truth_only=False)
            (self.out_dir / "pose_results_coco.json").write_text(json.dumps(results))
        meta = {
            **meta,
            "output_dir": str(self.out_dir),
            "images_written": self.written,
            "skipped": len(self.skipped),
            "skipped_inputs": self.skipped[:1000],
            "videos": {
                name: {
                    "file": str(self.out_dir / "vis" / f"{name}.mp4"),
                    "frames": w.frames,
                    "codec": w.codec,
                }
                for name, w in self.videos.items()
            },
            "torch_version": torch.__version__,
            "python": platform.python_version(),
        }
        (self.out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        return meta
