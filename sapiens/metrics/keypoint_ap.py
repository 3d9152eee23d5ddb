"""COCO keypoint AP (OKS) for any keypoint set: pycocotools' ``COCOeval`` numbers, computed on arrays.

State is kept as NumPy arrays (one chunk per ``add_predictions`` call, one small dict per GT image), so
that it moves between DDP ranks with ``torch.distributed.all_gather_object`` at pickle speed. Usage in a
LightningModule::

    metric = KeypointAP(load_keypoint_set("coco17"))
    # validation_step: metric.add_ground_truth(sample) once per image (duplicates are ignored)
    #                  metric.add_predictions(image_ids, keypoints, bbox_scores, areas)
    # on_validation_epoch_end:
    metric.gather(torch_all_gather_object)   # every rank; no-op without torch.distributed
    if trainer.is_global_zero: results = metric.compute("preds.json")
    metric.reset()

Prediction scoring follows the published top-down evaluation: the instance score is the box score
times the mean of the keypoint scores above ``keypoint_score_thr`` ("bbox_keypoint"), then OKS-NMS
with threshold ``nms_thr`` per image. The evaluation itself is :func:`sapiens.metrics.oks_eval.
evaluate_keypoints` (vectorised COCOeval, identical numbers; ``backend="pycocotools"`` runs COCOeval).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sapiens.labels import KeypointSet
from sapiens.metrics.oks_eval import (
    KeypointDetections,
    KeypointGroundTruth,
    evaluate_keypoints,
    evaluate_keypoints_pycocotools,
    planar,
    stack_planar,
    take_rows,
)
from sapiens.metrics.oks_nms import batched_oks_nms

__all__ = [
    "STAT_NAMES",
    "KeypointAP",
    "coco_results",
    "torch_all_gather_object",
]

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
BACKENDS = {"numpy": evaluate_keypoints, "pycocotools": evaluate_keypoints_pycocotools}
_PRED_KEYS = ("image_ids", "keypoints", "bbox_scores", "areas", "boxes")


def torch_all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (``[obj]`` when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class KeypointAP:
    """Accumulate GT and predictions over a dataset; compute OKS AP/AR as COCOeval does.

    Args:
        keypoint_set: the label space (its ``sigmas`` and ``groups`` are used) or a sigma list.
        score_mode: ``"bbox_keypoint"`` (box score x mean confident keypoint score),
            ``"bbox"`` or ``"keypoint"``.
        keypoint_score_thr: keypoint-score threshold for ``bbox_keypoint`` rescoring.
        nms_thr: OKS-NMS threshold per image; ``None`` disables NMS.
        part_groups: names of ``keypoint_set.groups`` to also evaluate separately (e.g.
            ``["body", "foot", "face", "left_hand", "right_hand"]`` for COCO-WholeBody); results
            are reported as ``"AP/<group>"`` and ``"AR/<group>"``.
        verbose: print a summary table of the stats.
        backend: ``"numpy"`` (vectorised, :mod:`sapiens.metrics.oks_eval`) or ``"pycocotools"``
            (COCOeval itself, several times slower; the same numbers).
    """

    def __init__(
        self,
        keypoint_set: KeypointSet | Sequence[float],
        score_mode: str = "bbox_keypoint",
        keypoint_score_thr: float = 0.2,
        nms_thr: float | None = 0.9,
        part_groups: Sequence[str] = (),
        verbose: bool = False,
        backend: str = "numpy",
    ) -> None:
        if isinstance(keypoint_set, KeypointSet):
            self.sigmas = np.asarray(keypoint_set.sigmas, dtype=np.float64)
            groups = keypoint_set.groups
        else:
            self.sigmas = np.asarray(keypoint_set, dtype=np.float64)
            groups = {}
        if score_mode not in ("bbox_keypoint", "bbox", "keypoint"):
            raise ValueError(f"score_mode must be bbox_keypoint, bbox or keypoint, got {score_mode}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        missing = [g for g in part_groups if g not in groups]
        if missing:
            raise ValueError(f"part_groups {missing} are not groups of the keypoint set")
        self.part_groups = {g: np.asarray(groups[g]) for g in part_groups}
        self.score_mode = score_mode
        self.keypoint_score_thr = keypoint_score_thr
        self.nms_thr = nms_thr
        self.verbose = verbose
        self.backend = backend
        self.reset()

    @property
    def num_keypoints(self) -> int:
        return int(self.sigmas.shape[0])

    def reset(self) -> None:
        """Forget all accumulated GT and predictions."""
        self.ground_truth: dict[int, dict[str, Any]] = {}
        # one dict of arrays (image_ids, keypoints, bbox_scores, areas) per add_predictions call
        self.predictions: list[dict[str, np.ndarray]] = []
        self._gt_arrays: KeypointGroundTruth | None = None

    # ------------------------------------------------------------------ accumulation
    def add_ground_truth(self, sample: dict[str, Any]) -> None:
        """Register one image's GT (a decoded pose sample or its JSON); repeated ids are ignored.

        Args:
            sample: ``{"image_id", "width", "height", "persons": [{"bbox" (4,), "area",
                "keypoints" (K, 3), optional "iscrowd"}]}`` (the ``image`` key is not needed).
        """
        image_id = int(sample["image_id"])
        if image_id in self.ground_truth:
            return
        persons = []
        for p in sample.get("persons", []):
            kpts = np.asarray(p["keypoints"], dtype=np.float64).reshape(-1, 3)
            if kpts.shape[0] != self.num_keypoints:
                raise ValueError(
                    f"image {image_id}: GT person has {kpts.shape[0]} keypoints, metric expects "
                    f"{self.num_keypoints} (length of sigmas)"
                )
            persons.append(
                {
                    "bbox": np.asarray(p["bbox"], dtype=np.float64).reshape(4),
                    "area": float(p["area"]),
                    "iscrowd": int(p.get("iscrowd", 0)),
                    "keypoints": kpts,
                }
            )
        self.ground_truth[image_id] = {
            "width": int(sample.get("width", 0)),
            "height": int(sample.get("height", 0)),
            "persons": persons,
        }
        self._gt_arrays = None

    def add_predictions(
        self,
        image_ids: Sequence[int] | np.ndarray,
        keypoints: np.ndarray,
        bbox_scores: Sequence[float] | np.ndarray,
        areas: Sequence[float] | np.ndarray,
        boxes: np.ndarray | None = None,
    ) -> None:
        """Register N predicted poses.

        Args:
            image_ids: (N,) image id of each pose.
            keypoints: float (N, K, 3) image-pixel (x, y, score).
            bbox_scores: (N,) detection score of the box each pose was cropped from (1 for GT).
            areas: (N,) instance area used by OKS-NMS (crop ``scale`` w*h).
            boxes: optional (N, 4) [x, y, w, h] person boxes, kept as ``bbox`` in the results.
        """
        kpts = np.asarray(keypoints, dtype=np.float64)
        if kpts.ndim != 3 or kpts.shape[1:] != (self.num_keypoints, 3):
            raise ValueError(f"keypoints must be (N, {self.num_keypoints}, 3), got shape {kpts.shape}")
        kpts = planar(kpts, copy=True)  # callers may reuse their buffers
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        scores = np.asarray(bbox_scores, dtype=np.float64).reshape(-1)
        area = np.asarray(areas, dtype=np.float64).reshape(-1)
        n = kpts.shape[0]
        box = np.full((n, 4), np.nan) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not len(ids) == len(scores) == len(area) == len(box) == n:
            raise ValueError("image_ids, keypoints, bbox_scores, areas (and boxes) must have the same N")
        self.predictions.append(dict(zip(_PRED_KEYS, (ids, kpts, scores, area, box), strict=True)))

    @property
    def num_predictions(self) -> int:
        return sum(len(chunk["image_ids"]) for chunk in self.predictions)

    def _stacked_predictions(self) -> dict[str, np.ndarray]:
        if len(self.predictions) == 1:
            return self.predictions[0]
        if not self.predictions:
            k = self.num_keypoints
            empty = (np.zeros(0, np.int64), np.zeros((0, k, 3)), np.zeros(0), np.zeros(0), np.zeros((0, 4)))
            return dict(zip(_PRED_KEYS, empty, strict=True))
        return {key: _concatenate([c[key] for c in self.predictions]) for key in _PRED_KEYS}

    def gather(self, all_gather_object: Callable[[Any], list[Any]]) -> None:
        """Merge the state of every rank into this one (call on all ranks).

        Args:
            all_gather_object: ``fn(obj) -> [obj_rank0, obj_rank1, ...]``, e.g.
                :func:`torch_all_gather_object` or ``lambda o: [o]`` on a single process.
                Exact duplicate predictions (from padded distributed samplers) are dropped.
        """
        states = all_gather_object({"gt": self.ground_truth, "pred": self._stacked_predictions()})
        self.reset()
        for state in states:
            for image_id, gt in state["gt"].items():
                self.ground_truth.setdefault(int(image_id), gt)
        preds = {key: _concatenate([s["pred"][key] for s in states]) for key in _PRED_KEYS}
        n = preds["image_ids"].shape[0]
        if n:  # the first copy of each (image, box score, keypoints) row, in gathered order
            ids = preds["image_ids"][:, None].view(np.float64)  # compared as bytes below
            rows = np.concatenate([ids, preds["bbox_scores"][:, None], preds["keypoints"].reshape(n, -1)], 1)
            rows = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))
            _, first = np.unique(rows.ravel(), return_index=True)
            preds = _take(preds, np.sort(first))
        self.predictions = [preds]

    # ------------------------------------------------------------------ evaluation
    def ground_truth_arrays(self) -> KeypointGroundTruth:
        """Every registered GT person stacked (cached until the GT changes)."""
        if self._gt_arrays is None:
            ids, kpts, boxes, areas, crowd = [], [], [], [], []
            for image_id, gt in sorted(self.ground_truth.items()):
                for p in gt["persons"]:
                    ids.append(image_id)
                    kpts.append(p["keypoints"])
                    boxes.append(p["bbox"])
                    areas.append(p["area"])
                    crowd.append(p["iscrowd"])
            k = self.num_keypoints
            self._gt_arrays = KeypointGroundTruth(
                image_ids=np.asarray(ids, dtype=np.int64),
                keypoints=stack_planar(kpts) if kpts else np.zeros((0, k, 3)),
                bboxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                areas=np.asarray(areas, dtype=np.float64),
                iscrowd=np.asarray(crowd, dtype=bool),
                images=np.asarray(sorted(self.ground_truth), dtype=np.int64),
            )
        return self._gt_arrays

    def scored_predictions(self, with_ground_truth_only: bool = True) -> KeypointDetections:
        """Rescored and OKS-NMS-filtered predictions, in registration order; those on images without
        registered GT are dropped (with a warning) unless ``with_ground_truth_only`` is False."""
        preds = self._stacked_predictions()
        known = np.isin(preds["image_ids"], np.fromiter(self.ground_truth, np.int64))
        if with_ground_truth_only and not known.all():
            warnings.warn(
                f"KeypointAP: {int((~known).sum())} predictions on images without registered GT were ignored",
                stacklevel=3,
            )
            preds = _take(preds, known)
        kpts, bbox = preds["keypoints"], preds["bbox_scores"]
        kscores = kpts[..., 2]
        if self.score_mode == "bbox":
            scores = bbox
        elif self.score_mode == "keypoint":
            scores = kscores.mean(-1)
        else:
            mask = kscores > self.keypoint_score_thr
            scores = bbox * ((kscores * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
        ids, boxes = preds["image_ids"], preds["boxes"]
        if self.nms_thr is not None:
            keep = batched_oks_nms(ids, kpts, scores, preds["areas"], self.sigmas, self.nms_thr)
            if not keep.all():  # (a copy of every kept pose: skipped when NMS removed none)
                ids, kpts, scores, boxes = ids[keep], take_rows(kpts, keep), scores[keep], boxes[keep]
        return KeypointDetections(ids, kpts, scores, boxes)

    def scored_results(self, with_ground_truth_only: bool = True) -> list[dict[str, Any]]:
        """:meth:`scored_predictions` as COCO keypoint results ``{"image_id", "category_id", "keypoints"
        [x, y, s] * K, "score"[, "bbox"]}``, by image (in order of first appearance), then by score
        when OKS-NMS ran (else as registered)."""
        dets = self.scored_predictions(with_ground_truth_only)
        return coco_results(dets, by_score=self.nms_thr is not None)

    def compute(self, results_path: str | Path | None = None) -> dict[str, float]:
        """Evaluate everything accumulated so far.

        Args:
            results_path: optional path; the rescored, NMS-filtered predictions are written there
                as a COCO keypoint results JSON.

        Returns:
            ``{"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}`` as
            floats (-1 where COCOeval has nothing to evaluate), plus ``"AP/<group>"``,
            ``"AR/<group>"`` for each requested part group.
        """
        if not self.ground_truth:
            raise ValueError("KeypointAP.compute: no ground truth registered (add_ground_truth)")
        dets = self.scored_predictions()
        if results_path is not None:
            Path(results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).write_text(json.dumps(coco_results(dets, by_score=self.nms_thr is not None)))
        if not dets.image_ids.size:
            warnings.warn("KeypointAP: no predictions to evaluate; reporting 0", stacklevel=2)
            metrics = dict.fromkeys(STAT_NAMES, 0.0)
            metrics.update({f"{m}/{g}": 0.0 for g in self.part_groups for m in ("AP", "AR")})
            return metrics
        gt, evaluate = self.ground_truth_arrays(), BACKENDS[self.backend]
        stats = evaluate(gt, dets, self.sigmas)
        metrics = {name: float(v) for name, v in zip(STAT_NAMES, stats, strict=True)}
        if self.verbose:
            print("  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        for group, index in self.part_groups.items():
            part = evaluate(gt.select_keypoints(index), dets.select_keypoints(index), self.sigmas[index])
            metrics[f"AP/{group}"] = float(part[0])
            metrics[f"AR/{group}"] = float(part[5])
        return metrics


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the first axis; (N, K, 3) keypoints stay planar."""
    if arrays[0].ndim == 3:
        out = np.empty((3, sum(a.shape[0] for a in arrays), arrays[0].shape[1]))
        np.concatenate([a.transpose(2, 0, 1) for a in arrays], axis=1, out=out)
        return out.transpose(1, 2, 0)
    return np.concatenate(arrays)


def _take(preds: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``index`` (int or bool) of every prediction array; keypoints stay planar."""
    return {key: take_rows(v, index) if v.ndim == 3 else v[index] for key, v in preds.items()}


def coco_results(dets: KeypointDetections, by_score: bool) -> list[dict[str, Any]]:
    """COCO keypoint results of ``dets``: grouped by image in order of first appearance, each image's
    poses by descending score (stable) when ``by_score``, else in their given order; ``bbox`` when the
    pose came with one."""
    images, first = np.unique(dets.image_ids, return_index=True)
    appearance = np.argsort(np.argsort(first))[np.searchsorted(images, dets.image_ids)]
    secondary = -dets.scores if by_score else np.zeros(len(dets.scores))
    order = np.lexsort((np.arange(len(dets.scores)), secondary, appearance))
    flat = dets.keypoints.reshape(dets.keypoints.shape[0], dets.keypoints.shape[1] * 3)
    boxes = dets.boxes if dets.boxes is not None else np.full((len(order), 4), np.nan)
    results = []
    for i in order:
        result = {
            "image_id": int(dets.image_ids[i]),
            "category_id": 1,
            "keypoints": flat[i].tolist(),
            "score": float(dets.scores[i]),
        }
        if not np.isnan(boxes[i]).any():
            result["bbox"] = boxes[i].tolist()
        results.append(result)
    return results
