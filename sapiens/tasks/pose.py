"""Top-down 2D pose: heatmap head, keypoint MSE (or OHKM) loss, flip test, OKS AP through COCOeval.

Batches come from :class:`sapiens.data.pose_transform.TopDownPoseTransform`: one person crop per item
with ``image`` (B, 3, H, W), ``heatmaps`` (B, K, H/4, W/4), ``target_weight`` (B, K), ``center`` and
``scale`` (B, 2) of the crop in image pixels, ``image_id``, ``bbox_score`` and ``area``.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from sapiens.codecs.udp_heatmap import UDPHeatmap, flip_heatmaps
from sapiens.data.shard_urls import expand_shards
from sapiens.data.topdown import crop_to_image
from sapiens.labels import load_keypoint_set
from sapiens.losses import KeypointMSELoss, KeypointOHKMMSELoss
from sapiens.metrics.keypoint_ap import KeypointAP, torch_all_gather_object
from sapiens.models.heads import POSE_CONV_CHANNELS, POSE_DECONV_CHANNELS, HeatmapHead
from sapiens.tasks.base import Task
from sapiens.visualize import denormalize, tile, upscale

log = logging.getLogger(__name__)


def read_pose_ground_truth(shards: str | Sequence[str]) -> list[dict]:
    """The ``json`` member of every sample in local pose shards (no image decoding).

    Returns dicts ``{"image_id", "width", "height", "persons": [...]}`` as written by the converters.
    """
    records = []
    for url in expand_shards(shards):
        if "://" in url or url.startswith("pipe:"):
            raise ValueError(f"pose ground truth is read from local shards only, got {url}")
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    records.append(json.load(tar.extractfile(member)))
    return records


class PoseTask(Task):
    """Heatmap pose estimation (published ``HeatmapHead`` + UDP codec + DARK-UDP decoding).

    Args:
        in_channels: backbone width.
        image_size: (H, W) of the person crops.
        keypoint_set: name or YAML path of the label space (coco17, coco_wholebody133, goliath308...).
        deconv_channels, conv_channels: head widths (published 768, 768).
        head: ``fn(in_channels, out_channels)`` building another head layout instead (a Hydra partial, e.g.
            :class:`sapiens.models.heads_sapiens2.PoseHeatmapHead` with its widths); None = Sapiens'
            ``HeatmapHead`` with ``deconv_channels`` / ``conv_channels``.
        loss_weight: multiplier of the keypoint loss (Sapiens 1, Sapiens2 10).
        sigma: Gaussian sigma of the targets in heatmap pixels (published 6 at 256x192).
        loss: ``mse`` or ``ohkm`` (top-k hardest keypoints, used for Goliath 0.3b / 1b).
        ohkm_topk: k for OHKM.
        flip_test: average with the prediction of the mirrored crop.
        part_groups: keypoint groups also scored separately (e.g. body, foot, face, hands).
        results_file: where to write the COCO results JSON of the last validation (None: not written).
    """

    name = "pose"

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        keypoint_set: str = "coco17",
        deconv_channels: Sequence[int] = POSE_DECONV_CHANNELS,
        conv_channels: Sequence[int] = POSE_CONV_CHANNELS,
        sigma: float = 6.0,
        loss: str = "mse",
        ohkm_topk: int = 8,
        flip_test: bool = True,
        part_groups: Sequence[str] = (),
        results_file: str | None = None,
        head: Callable[..., torch.nn.Module] | None = None,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.kset = load_keypoint_set(keypoint_set)
        k = self.kset.num_keypoints
        if head is None:
            self.head = HeatmapHead(in_channels, k, tuple(deconv_channels), tuple(conv_channels))
        else:
            self.head = head(in_channels=in_channels, out_channels=k)
        if loss not in ("mse", "ohkm"):
            raise ValueError(f"pose loss must be 'mse' or 'ohkm', got {loss!r}")
        self.loss_fn = (
            KeypointMSELoss(loss_weight=loss_weight)
            if loss == "mse"
            else KeypointOHKMMSELoss(topk=ohkm_topk, loss_weight=loss_weight)
        )
        h, w = (int(s) for s in image_size)
        self.input_size = (w, h)
        self.codec = UDPHeatmap(input_size=(w, h), heatmap_size=(w // 4, h // 4), sigma=sigma)
        self.flip_test = flip_test
        self.results_file = results_file
        self.metric = KeypointAP(self.kset, part_groups=part_groups)
        self._gt_ready = False

    def predict(self, net: Callable[[torch.Tensor], torch.Tensor], batch: dict) -> torch.Tensor:
        """Heatmaps (B, K, H/4, W/4), averaged with the flipped crop's (channels swapped back)."""
        heatmaps = net(batch["image"])
        if self.flip_test:
            flipped = net(batch["image"].flip(-1))
            heatmaps = 0.5 * (heatmaps + flip_heatmaps(flipped, self.kset.flip_index))
        return heatmaps

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.loss_fn(outputs, batch["heatmaps"], batch["target_weight"])

    def prepare_validation(self, datamodule) -> None:
        """Register the ground truth of the validation shards once (COCOeval needs every GT person)."""
        if self._gt_ready:
            return
        records = read_pose_ground_truth(datamodule.val_shards)
        for record in records:
            self.metric.add_ground_truth(record)
        log.info("pose ground truth: %d images from %s", len(records), datamodule.val_shards)
        self._gt_ready = True

    def decode(self, heatmaps: torch.Tensor, batch: dict) -> np.ndarray:
        """Heatmaps (B, K, h, w) -> keypoints (B, K, 3) in image pixels with scores."""
        crop_xy, scores = self.codec.decode(heatmaps.float())
        xy = crop_to_image(
            crop_xy, batch["center"].cpu().numpy(), batch["scale"].cpu().numpy(), self.input_size
        )
        return np.concatenate([xy, scores[..., None]], axis=-1)

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        keypoints = self.decode(outputs, batch)
        self.metric.add_predictions(
            [int(i) for i in batch["image_id"]],
            keypoints,
            torch.as_tensor(batch["bbox_score"]).cpu().numpy(),
            torch.as_tensor(batch["area"]).cpu().numpy(),
        )

    def compute_metrics(self) -> dict[str, float]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.metric.gather(torch_all_gather_object)  # every rank then scores all predictions
        if not self.metric.predictions:
            return {}
        return self.metric.compute(results_path=self.results_file)

    def reset_metrics(self) -> None:
        self.metric.predictions = []  # keep the ground truth for the next validation

    def render(self, batch: dict, outputs: torch.Tensor, num: int) -> np.ndarray:
        """Rows of (crop with GT skeleton | crop with predicted skeleton)."""
        gt_xy, _ = self.codec.decode(batch["heatmaps"][:num].float())
        pred_xy, _ = self.codec.decode(outputs[:num].float())
        rows = []
        for i in range(min(num, outputs.shape[0])):
            crop = upscale(denormalize(batch["image"][i]))
            factor = crop.shape[0] / batch["image"].shape[-2]
            visible = batch["target_weight"][i].cpu().numpy() > 0
            gt = self.draw(crop, gt_xy[i] * factor, visible)
            pred = self.draw(crop, pred_xy[i] * factor, visible)  # where the GT is labelled
            rows.append([gt, pred])
        return tile(rows)

    def draw(
        self, image: np.ndarray, xy: np.ndarray, show: np.ndarray, radius: int = 2, thickness: int = 1
    ) -> np.ndarray:
        """Skeleton of (K, 2) points ``xy`` over a copy of ``image``; ``show`` (K,) masks keypoints."""
        out = image.copy()
        self._draw_into(out, xy, show, radius, thickness)
        return out

    def _draw_into(
        self, out: np.ndarray, xy: np.ndarray, show: np.ndarray, radius: int, thickness: int
    ) -> None:
        colors = np.asarray(self.kset.link_colors) if len(self.kset.link_colors) else None
        for j, (a, b) in enumerate(self.kset.skeleton):
            if show[a] and show[b]:
                color = tuple(int(c) for c in colors[j]) if colors is not None else (0, 255, 0)
                pa = tuple(int(round(v)) for v in xy[a])
                pb = tuple(int(round(v)) for v in xy[b])
                cv2.line(out, pa, pb, color, thickness, cv2.LINE_AA)
        for k in np.flatnonzero(show):
            color = tuple(int(c) for c in self.kset.colors[k])
            cv2.circle(out, tuple(int(round(v)) for v in xy[k]), radius, color, -1, cv2.LINE_AA)

    def overlay(
        self,
        image: np.ndarray,
        keypoints: np.ndarray,
        boxes: np.ndarray | None = None,
        kpt_thr: float = 0.3,
    ) -> np.ndarray:
        """Every person's box and skeleton (keypoints scoring above ``kpt_thr``) over a copy of ``image``.

        Args:
            image: (H, W, 3) uint8 RGB.
            keypoints: (N, K, 3) image-pixel (x, y, score).
            boxes: (N, 4) [x, y, w, h] or None.
        """
        size = max(image.shape[:2])
        radius, thickness = max(2, round(size / 200)), max(1, round(size / 400))
        out = image.copy()
        for n, person in enumerate(np.asarray(keypoints).reshape(-1, self.kset.num_keypoints, 3)):
            if boxes is not None:
                x, y, w, h = (int(round(v)) for v in boxes[n])
                cv2.rectangle(out, (x, y), (x + w, y + h), (255, 255, 255), thickness, cv2.LINE_AA)
            self._draw_into(out, person[:, :2], person[:, 2] > kpt_thr, radius, thickness)
        return out
