"""COCO keypoint AP (OKS) for any keypoint set, through pycocotools ``COCOeval``.

State is kept in plain Python lists/dicts so that it can be moved between DDP ranks with
``torch.distributed.all_gather_object``. Usage in a LightningModule::

    metric = KeypointAP(load_keypoint_set("coco17"))
    # validation_step: metric.add_ground_truth(sample) once per image (duplicates are ignored)
    #                  metric.add_predictions(image_ids, keypoints, bbox_scores, areas)
    # on_validation_epoch_end:
    metric.gather(torch_all_gather_object)   # every rank; no-op without torch.distributed
    if trainer.is_global_zero: results = metric.compute("preds.json")
    metric.reset()

Prediction scoring follows the published top-down evaluation: the instance score is the box score
times the mean of the keypoint scores above ``keypoint_score_thr`` ("bbox_keypoint"), then OKS-NMS
with threshold ``nms_thr`` per image.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sapiens.labels import KeypointSet

__all__ = ["STAT_NAMES", "KeypointAP", "oks_nms", "torch_all_gather_object"]

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def torch_all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (``[obj]`` when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _oks_one_to_many(
    ref: np.ndarray, others: np.ndarray, ref_area: float, areas: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """OKS between one (K, 3) pose and (M, K, 3) poses, using the mean of the two areas."""
    var = (2 * sigmas) ** 2
    d2 = ((others[..., :2] - ref[None, :, :2]) ** 2).sum(-1)
    e = d2 / var[None] / ((ref_area + areas[:, None]) / 2 + np.spacing(1)) / 2
    return np.exp(-e).mean(-1)


def oks_nms(
    keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas: np.ndarray, thr: float
) -> list[int]:
    """Greedy OKS non-maximum suppression within one image.

    Args:
        keypoints: float (M, K, 3); scores: (M,); areas: (M,) instance areas; sigmas: (K,).
        thr: drop poses whose OKS with a higher-scored kept pose exceeds ``thr``.

    Returns:
        Indices kept, highest score first.
    """
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if not order:
            break
        rest = np.asarray(order)
        oks = _oks_one_to_many(keypoints[i], keypoints[rest], areas[i], areas[rest], sigmas)
        order = [int(j) for j, o in zip(rest, oks, strict=True) if o <= thr]
    return keep


class KeypointAP:
    """Accumulate GT and predictions over a dataset; compute OKS AP/AR with COCOeval.

    Args:
        keypoint_set: the label space (its ``sigmas`` and ``groups`` are used) or a sigma list.
        score_mode: ``"bbox_keypoint"`` (box score x mean confident keypoint score),
            ``"bbox"`` or ``"keypoint"``.
        keypoint_score_thr: keypoint-score threshold for ``bbox_keypoint`` rescoring.
        nms_thr: OKS-NMS threshold per image; ``None`` disables NMS.
        part_groups: names of ``keypoint_set.groups`` to also evaluate separately (e.g.
            ``["body", "foot", "face", "left_hand", "right_hand"]`` for COCO-WholeBody); results
            are reported as ``"AP/<group>"`` and ``"AR/<group>"``.
        verbose: let COCOeval print its summary tables.
    """

    def __init__(
        self,
        keypoint_set: KeypointSet | Sequence[float],
        score_mode: str = "bbox_keypoint",
        keypoint_score_thr: float = 0.2,
        nms_thr: float | None = 0.9,
        part_groups: Sequence[str] = (),
        verbose: bool = False,
    ) -> None:
        if isinstance(keypoint_set, KeypointSet):
            self.sigmas = np.asarray(keypoint_set.sigmas, dtype=np.float64)
            groups = keypoint_set.groups
        else:
            self.sigmas = np.asarray(keypoint_set, dtype=np.float64)
            groups = {}
        if score_mode not in ("bbox_keypoint", "bbox", "keypoint"):
            raise ValueError(f"score_mode must be bbox_keypoint, bbox or keypoint, got {score_mode}")
        missing = [g for g in part_groups if g not in groups]
        if missing:
            raise ValueError(f"part_groups {missing} are not groups of the keypoint set")
        self.part_groups = {g: np.asarray(groups[g]) for g in part_groups}
        self.score_mode = score_mode
        self.keypoint_score_thr = keypoint_score_thr
        self.nms_thr = nms_thr
        self.verbose = verbose
        self.reset()

    @property
    def num_keypoints(self) -> int:
        return int(self.sigmas.shape[0])

    def reset(self) -> None:
        """Forget all accumulated GT and predictions."""
        self.ground_truth: dict[int, dict[str, Any]] = {}
        self.predictions: list[dict[str, Any]] = []

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
                    "bbox": [float(v) for v in np.asarray(p["bbox"]).reshape(4)],
                    "area": float(p["area"]),
                    "iscrowd": int(p.get("iscrowd", 0)),
                    "keypoints": kpts.tolist(),
                }
            )
        self.ground_truth[image_id] = {
            "width": int(sample.get("width", 0)),
            "height": int(sample.get("height", 0)),
            "persons": persons,
        }

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
        ids = np.asarray(image_ids).reshape(-1)
        if kpts.ndim != 3 or kpts.shape[1:] != (self.num_keypoints, 3):
            raise ValueError(f"keypoints must be (N, {self.num_keypoints}, 3), got shape {kpts.shape}")
        scores = np.asarray(bbox_scores, dtype=np.float64).reshape(-1)
        area = np.asarray(areas, dtype=np.float64).reshape(-1)
        if not len(ids) == len(scores) == len(area) == kpts.shape[0]:
            raise ValueError("image_ids, keypoints, bbox_scores and areas must have the same N")
        for i in range(kpts.shape[0]):
            pred = {
                "image_id": int(ids[i]),
                "keypoints": kpts[i].tolist(),
                "bbox_score": float(scores[i]),
                "area": float(area[i]),
            }
            if boxes is not None:
                pred["bbox"] = [float(v) for v in np.asarray(boxes[i]).reshape(4)]
            self.predictions.append(pred)

    def gather(self, all_gather_object: Callable[[Any], list[Any]]) -> None:
        """Merge the state of every rank into this one (call on all ranks).

        Args:
            all_gather_object: ``fn(obj) -> [obj_rank0, obj_rank1, ...]``, e.g.
                :func:`torch_all_gather_object` or ``lambda o: [o]`` on a single process.
                Exact duplicate predictions (from padded distributed samplers) are dropped.
        """
        states = all_gather_object({"gt": self.ground_truth, "pred": self.predictions})
        self.reset()
        seen = set()
        for state in states:
            for image_id, gt in state["gt"].items():
                self.ground_truth.setdefault(int(image_id), gt)
            for pred in state["pred"]:
                key = (pred["image_id"], pred["bbox_score"], json.dumps(pred["keypoints"]))
                if key not in seen:
                    seen.add(key)
                    self.predictions.append(pred)

    # ------------------------------------------------------------------ evaluation
    def scored_results(self, with_ground_truth_only: bool = True) -> list[dict[str, Any]]:
        """The predictions rescored (``score_mode``) and OKS-NMS filtered per image, as COCO keypoint
        results ``{"image_id", "category_id", "keypoints" [x, y, s] * K, "score"[, "bbox"]}``; those on
        images without registered GT are dropped unless ``with_ground_truth_only`` is False."""
        by_image: dict[int, list[dict]] = {}
        dropped = 0
        for pred in self.predictions:
            if with_ground_truth_only and pred["image_id"] not in self.ground_truth:
                dropped += 1
                continue
            by_image.setdefault(pred["image_id"], []).append(pred)
        if dropped:
            warnings.warn(
                f"KeypointAP: {dropped} predictions on images without registered GT were ignored",
                stacklevel=3,
            )
        results = []
        for image_id, preds in by_image.items():
            kpts = np.asarray([p["keypoints"] for p in preds], dtype=np.float64)
            kscores = kpts[..., 2]
            bbox = np.asarray([p["bbox_score"] for p in preds])
            if self.score_mode == "bbox":
                scores = bbox
            elif self.score_mode == "keypoint":
                scores = kscores.mean(-1)
            else:
                mask = kscores > self.keypoint_score_thr
                mean = (kscores * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
                scores = bbox * mean
            keep = range(len(preds))
            if self.nms_thr is not None:
                areas = np.asarray([p["area"] for p in preds])
                keep = oks_nms(kpts, scores, areas, self.sigmas, self.nms_thr)
            for i in keep:
                result = {
                    "image_id": image_id,
                    "category_id": 1,
                    "keypoints": kpts[i].reshape(-1).tolist(),
                    "score": float(scores[i]),
                }
                if "bbox" in preds[i]:
                    result["bbox"] = preds[i]["bbox"]
                results.append(result)
        return results

    def _gt_dict(self, index: np.ndarray) -> dict[str, Any]:
        """COCO GT dict restricted to keypoint ``index`` (num_keypoints counted on it)."""
        images, annotations = [], []
        for image_id, gt in sorted(self.ground_truth.items()):
            images.append({"id": image_id, "width": gt["width"], "height": gt["height"]})
            for p in gt["persons"]:
                kpts = np.asarray(p["keypoints"], dtype=np.float64).reshape(-1, 3)[index]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": p["bbox"],
                        "area": p["area"],
                        "iscrowd": p["iscrowd"],
                        "keypoints": kpts.reshape(-1).tolist(),
                        "num_keypoints": int((kpts[:, 2] > 0).sum()),
                    }
                )
        categories = [{"id": 1, "name": "person", "supercategory": "person"}]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _evaluate(self, results: list[dict], index: np.ndarray) -> np.ndarray:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        sub = []
        for r in results:
            k = np.asarray(r["keypoints"]).reshape(-1, 3)[index]
            sub.append({**r, "keypoints": k.reshape(-1).tolist()})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # pycocotools prints unconditionally
            gt = COCO()
            gt.dataset = self._gt_dict(index)
            gt.createIndex()
            dt = gt.loadRes(sub)
            ev = COCOeval(gt, dt, iouType="keypoints")
            ev.params.kpt_oks_sigmas = self.sigmas[index]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if self.verbose:
            print(out.getvalue())
        return np.asarray(ev.stats, dtype=np.float64)

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
        results = self.scored_results()
        if results_path is not None:
            Path(results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).write_text(json.dumps(results))
        if not results:
            warnings.warn("KeypointAP: no predictions to evaluate; reporting 0", stacklevel=2)
            metrics = dict.fromkeys(STAT_NAMES, 0.0)
            metrics.update({f"{m}/{g}": 0.0 for g in self.part_groups for m in ("AP", "AR")})
            return metrics
        stats = self._evaluate(results, np.arange(self.num_keypoints))
        metrics = {name: float(v) for name, v in zip(STAT_NAMES, stats, strict=True)}
        for group, index in self.part_groups.items():
            part = self._evaluate(results, index)
            metrics[f"AP/{group}"] = float(part[0])
            metrics[f"AR/{group}"] = float(part[5])
        return metrics
