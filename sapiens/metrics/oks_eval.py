"""COCO keypoint evaluation (OKS AP / AR), vectorised over images: pycocotools' numbers, from arrays.

:func:`evaluate_keypoints` reproduces ``COCOeval(iouType="keypoints")`` ``evaluate`` / ``accumulate`` /
``summarize`` for one category, step for step, but on stacked arrays instead of one Python dict per
annotation and one Python loop per (image, area range, threshold, detection, GT):

- per image, detections sorted by score (stable: ties keep their given order), the first 20 kept;
- OKS as in ``COCOeval.computeOks``: labelled GT keypoints only, or, for a GT without labelled
  keypoints, the distance to its box doubled on each side; ``area + eps`` of the GT;
- per area range (all / medium 32^2-96^2 / large > 96^2), GT ignored when crowd, without labelled
  keypoints or outside the range, and sorted non-ignored first (stable);
- greedy matching per OKS threshold 0.50:0.05:0.95 in score order: the best still-free non-ignored GT
  (the later one on ties) at OKS >= threshold, else the best ignored GT (crowd GT can match many);
  unmatched detections outside the area range are ignored;
- over the dataset, detections stably sorted by score in image order, precision envelope, precision
  at 101 recall points, recall at 20 detections, and the ten ``COCOeval.stats``.

One loop remains: over detection ranks (at most 20), each step vectorised over images x thresholds.
:func:`evaluate_keypoints_pycocotools` runs the real ``COCOeval`` on the same arrays (the reference
the tests and the benchmark compare against).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

__all__ = [
    "KeypointDetections",
    "KeypointGroundTruth",
    "evaluate_keypoints",
    "evaluate_keypoints_pycocotools",
    "cocoeval_stats",
    "coco_dicts",
    "planar",
    "stack_planar",
    "take_rows",
]

MAX_DETS = 20
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = ((0**2, 1e5**2), (32**2, 96**2), (96**2, 1e5**2))  # all, medium, large
_PAIR_CHUNK = 1 << 18  # OKS elements (pairs x keypoints) computed at once


def planar(keypoints: np.ndarray, copy: bool = False) -> np.ndarray:
    """(N, K, 3) keypoints as a view of contiguous (3, N, K) float64 planes (x, y, visibility or score).

    Every operation here works per coordinate, over many poses at once; in this layout each plane is
    contiguous, so no strided pass over the (N, K, 3) array is needed. A copy only when ``keypoints``
    is not planar already, or when ``copy``."""
    planes = np.asarray(keypoints, dtype=np.float64).transpose(2, 0, 1)
    if copy or not planes.flags.c_contiguous:
        planes = np.array(planes, order="C")
    return planes.transpose(1, 2, 0)


def take_rows(keypoints: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``keypoints[index]`` (poses ``index`` (int or bool) of (N, K, 3)), planar like :func:`planar`
    (``np.take`` writes a C-ordered result; fancy indexing may not)."""
    index = np.flatnonzero(index) if np.asarray(index).dtype == bool else index
    return np.take(keypoints.transpose(2, 0, 1), index, axis=1).transpose(1, 2, 0)


def take_keypoints(keypoints: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``keypoints[:, index]`` (keypoints ``index`` of every pose), planar."""
    return np.take(keypoints.transpose(2, 0, 1), index, axis=2).transpose(1, 2, 0)


def stack_planar(poses: list[np.ndarray]) -> np.ndarray:
    """``np.stack(poses)`` of (K, 3) poses into (N, K, 3), planar."""
    out = np.empty((3, len(poses), poses[0].shape[0]))
    np.stack([p.T for p in poses], axis=1, out=out)
    return out.transpose(1, 2, 0)


@dataclass
class KeypointGroundTruth:
    """Every GT person of a dataset, stacked.

    Attributes:
        image_ids: (G,) int image of each person.
        keypoints: (G, K, 3) float (x, y, v); v > 0 = labelled; fastest when :func:`planar`.
        bboxes: (G, 4) float xywh boxes (used for GT without labelled keypoints).
        areas: (G,) float person areas (area ranges, OKS scale).
        iscrowd: (G,) bool crowd annotations (always ignored; may match several detections).
        images: (I,) int every image of the dataset, including images without people.
    """

    image_ids: np.ndarray
    keypoints: np.ndarray
    bboxes: np.ndarray
    areas: np.ndarray
    iscrowd: np.ndarray
    images: np.ndarray

    def select_keypoints(self, index: np.ndarray) -> KeypointGroundTruth:
        """The same people restricted to keypoints ``index`` (K',) (a part group)."""
        return KeypointGroundTruth(
            self.image_ids,
            take_keypoints(self.keypoints, index),
            self.bboxes,
            self.areas,
            self.iscrowd,
            self.images,
        )


@dataclass
class KeypointDetections:
    """Scored pose detections, stacked: ``image_ids`` (N,), ``keypoints`` (N, K, 3) (fastest when
    :func:`planar`), ``scores`` (N,).

    Their area is the box around all K keypoints, as ``COCO.loadRes`` computes it."""

    image_ids: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray | None = None  # (N, 4) xywh person boxes when known (NaN rows: none); not evaluated

    def select_keypoints(self, index: np.ndarray) -> KeypointDetections:
        return KeypointDetections(
            self.image_ids, take_keypoints(self.keypoints, index), self.scores, self.boxes
        )


def _padded(owner: np.ndarray, num_rows: int, width: int) -> np.ndarray:
    """Indices of the items of each row in given order, (num_rows, width), -1 padded.

    ``owner`` (N,) is the row of each item, non-decreasing."""
    out = np.full((num_rows, max(width, 1)), -1, dtype=np.int64)
    starts = np.searchsorted(owner, np.arange(num_rows))
    position = np.arange(owner.shape[0]) - starts[owner]
    out[owner, position] = np.arange(owner.shape[0])
    return out


def _oks_pairs(gt: KeypointGroundTruth, dt_xy: np.ndarray, pair_g: np.ndarray, pair_d: np.ndarray, var):
    """OKS of detection ``pair_d[p]`` (rows of ``dt_xy`` (D, K, 2)) with GT ``pair_g[p]`` (P,), as
    ``COCOeval.computeOks`` (the same operations in the same order, on contiguous planes, in place)."""
    out = np.empty(pair_g.shape[0])
    gx, gy = (np.ascontiguousarray(gt.keypoints[..., i]) for i in range(2))
    dx_plane, dy_plane = (np.ascontiguousarray(dt_xy[..., i]) for i in range(2))
    hidden = gt.keypoints[..., 2] <= 0
    count = (~hidden).sum(-1)
    scale = gt.areas + np.spacing(1)
    step = max(1, _PAIR_CHUNK // max(var.shape[0], 1))
    for start in range(0, pair_g.shape[0], step):
        g, d = pair_g[start : start + step], pair_d[start : start + step]
        dx, dy = dx_plane[d], dy_plane[d]
        dx -= gx[g]
        dy -= gy[g]
        out[start : start + step] = _oks_sum(dx, dy, var, scale[g], hidden[g]) / np.maximum(count[g], 1)
    unlabelled = count[pair_g] == 0  # distance to the GT box doubled on each side; every keypoint
    if unlabelled.any():
        g, d = pair_g[unlabelled], pair_d[unlabelled]
        x0, y0, w, h = (gt.bboxes[g, i][:, None] for i in range(4))
        xd, yd = dx_plane[d], dy_plane[d]
        dx = np.maximum(0, (x0 - w) - xd) + np.maximum(0, xd - (x0 + w * 2))
        dy = np.maximum(0, (y0 - h) - yd) + np.maximum(0, yd - (y0 + h * 2))
        out[unlabelled] = _oks_sum(dx, dy, var, scale[g], None) / var.shape[0]
    return out


def _oks_sum(dx, dy, var, scale, hidden):
    """sum_k exp(-(dx^2 + dy^2) / var_k / scale / 2) over keypoints not ``hidden``; overwrites dx, dy."""
    np.multiply(dx, dx, out=dx)
    np.multiply(dy, dy, out=dy)
    dx += dy
    dx /= var
    dx /= scale[:, None]
    dx /= 2
    np.negative(dx, out=dx)
    np.exp(dx, out=dx)
    if hidden is not None:
        dx[hidden] = 0.0
    return dx.sum(-1)


def _match(ious, gt_ignore, gt_crowd, gt_valid, num_dets):
    """Greedy matching of one area range: ``COCOeval.evaluateImg``'s loops over detections (score
    order) and GT (non-ignored first), each step run for every image and threshold at once.

    Args:
        ious: (I, D, G) OKS, GT sorted non-ignored first; gt_ignore, gt_crowd, gt_valid: (I, G) bool;
        num_dets: (I,) detections per image (columns beyond are padding).

    Returns:
        matched (T, I, D) and on_ignored (T, I, D): matched to an ignored GT.
    """
    n_img, n_det, n_gt = ious.shape
    busy = np.argsort(-num_dets, kind="stable")  # images with more detections first: rank d
    active = (num_dets[busy][None, :] > np.arange(n_det)[:, None]).sum(1)  # runs on a prefix
    ious = np.ascontiguousarray(ious[busy].transpose(1, 2, 0))  # (D, G, I)
    ignore, crowd, valid = (np.ascontiguousarray(x[busy].T) for x in (gt_ignore, gt_crowd, gt_valid))
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[:, None]
    n_thr = IOU_THRS.size
    taken = np.zeros((n_gt, n_thr, n_img), dtype=bool)
    matched = np.zeros((n_det, n_thr, n_img), dtype=bool)
    on_ignored = np.zeros_like(matched)
    for d in range(n_det):
        n = int(active[d])
        best = np.repeat(thr, n, axis=1)  # a match needs OKS >= threshold, then >= the best so far
        best_gt = np.full((n_thr, n), -1)
        on_regular = np.zeros((n_thr, n), dtype=bool)
        for g in range(n_gt):
            iou = ious[d, g, :n]
            # a GT still free (crowd GT are never used up), at least as good as the best so far, and
            # not an ignored GT once a regular one matched (COCOeval's `break`)
            ok = (iou >= best) & valid[g, :n] & ~(taken[g, :, :n] & ~crowd[g, :n])
            ok &= ~(on_regular & ignore[g, :n])
            np.copyto(best, iou[None].repeat(n_thr, 0), where=ok)
            best_gt[ok] = g
            np.copyto(on_regular, ~ignore[g, :n][None].repeat(n_thr, 0), where=ok)
        hit = best_gt >= 0
        matched[d, :, :n] = hit
        on_ignored[d, :, :n] = hit & ~on_regular
        for g in range(n_gt):
            taken[g, :, :n] |= best_gt == g
    back = np.argsort(busy)
    return matched[:, :, back].transpose(1, 2, 0), on_ignored[:, :, back].transpose(1, 2, 0)


def _precision_recall(scores, tp, fp, num_positive):
    """COCOeval.accumulate for one area range: (T, R) precision and (T,) recall."""
    t = tp.shape[0]
    if num_positive == 0:
        return -np.ones((t, REC_THRS.size)), -np.ones(t)
    order = np.argsort(-scores, kind="mergesort")
    tp_sum = np.cumsum(tp[:, order], axis=1).astype(float)
    fp_sum = np.cumsum(fp[:, order], axis=1).astype(float)
    nd = tp_sum.shape[1]
    precision = np.zeros((t, REC_THRS.size))
    if nd == 0:
        return precision, np.zeros(t)
    rc = tp_sum / num_positive
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    for ti in range(t):
        inds = np.searchsorted(rc[ti], REC_THRS, side="left")
        inside = inds < nd
        precision[ti, inside] = pr[ti, inds[inside]]
    return precision, rc[:, -1].copy()


def _summary(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """``COCOeval.summarize`` for keypoints: precision (T, R, A), recall (T, A) -> the ten stats."""

    def mean(values):
        kept = values[values > -1]
        return -1.0 if kept.size == 0 else float(np.mean(kept))

    t50, t75 = np.where(IOU_THRS == 0.5)[0], np.where(IOU_THRS == 0.75)[0]
    stats = []
    for arr in (precision, recall):
        stats += [
            mean(arr[..., 0]),
            mean(arr[t50][..., 0]),
            mean(arr[t75][..., 0]),
            mean(arr[..., 1]),
            mean(arr[..., 2]),
        ]
    return np.asarray(stats)


def evaluate_keypoints(gt: KeypointGroundTruth, dt: KeypointDetections, sigmas: np.ndarray) -> np.ndarray:
    """The ten ``COCOeval(iouType="keypoints").stats`` (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm,
    ARl; -1 where nothing is evaluated) of detections ``dt`` against ``gt`` with OKS ``sigmas`` (K,).

    Detections must lie on images of ``gt.images`` (as ``COCO.loadRes`` requires)."""
    images = np.unique(gt.images)
    n_img = images.shape[0]
    g_img = np.searchsorted(images, gt.image_ids)
    d_img = np.searchsorted(images, dt.image_ids)
    if dt.image_ids.size and (d_img.max() >= n_img or np.any(images[d_img] != dt.image_ids)):
        raise ValueError("evaluate_keypoints: detections on images that are not in the ground truth")
    if gt.image_ids.size and np.any(images[np.minimum(g_img, n_img - 1)] != gt.image_ids):
        raise ValueError("evaluate_keypoints: GT people on images missing from gt.images")
    if gt.image_ids.size == 0:
        return -np.ones(10)  # no positives in any area range: COCOeval leaves every stat at -1

    # Detections: per image by score (stable), the first MAX_DETS.
    order = np.lexsort((np.arange(d_img.shape[0]), -dt.scores, d_img))
    rank = np.arange(order.shape[0]) - np.searchsorted(d_img[order], d_img[order])
    order = order[rank < MAX_DETS]
    d_owner = d_img[order]
    num_dets = np.bincount(d_owner, minlength=n_img)
    det_index = _padded(d_owner, n_img, int(num_dets.max(initial=0)))  # into `order`
    det_valid = det_index >= 0
    xy = dt.keypoints[..., :2]  # rows are picked through `order` below: no copy of the poses
    areas = np.ptp(xy[..., 0], axis=-1) * np.ptp(xy[..., 1], axis=-1) if order.size else np.zeros(0)
    areas, scores = areas[order], dt.scores[order]

    # Ground truth in the given order (stable sort by image).
    g_order = np.argsort(g_img, kind="stable")
    g_owner = g_img[g_order]
    num_gt = np.bincount(g_owner, minlength=n_img)
    gt_index = _padded(g_owner, n_img, int(num_gt.max(initial=0)))
    gt_valid = gt_index >= 0
    gt_rows = np.where(gt_valid, g_order[np.maximum(gt_index, 0)], 0)  # into gt arrays

    # OKS of every (detection, GT) pair of an image: (I, D, G).
    ious = np.full((n_img, det_index.shape[1], gt_index.shape[1]), -np.inf)
    pair = det_valid[:, :, None] & gt_valid[:, None, :]
    ii, dd, gg = np.nonzero(pair)
    var = (np.asarray(sigmas, dtype=np.float64) * 2) ** 2
    ious[ii, dd, gg] = _oks_pairs(gt, xy, gt_rows[ii, gg], order[det_index[ii, dd]], var)

    labelled = (gt.keypoints[..., 2] > 0).sum(-1)
    base_ignore = (gt.iscrowd.astype(bool) | (labelled == 0))[gt_rows]
    crowd = gt.iscrowd.astype(bool)[gt_rows]
    g_area = gt.areas[gt_rows]
    d_area = np.where(det_valid, areas[np.maximum(det_index, 0)] if areas.size else 0.0, 0.0)
    flat_scores = scores[det_index[det_valid]]

    precision = -np.ones((IOU_THRS.size, REC_THRS.size, len(AREA_RANGES)))
    recall = -np.ones((IOU_THRS.size, len(AREA_RANGES)))
    for a, (lo, hi) in enumerate(AREA_RANGES):
        ignore = base_ignore | (g_area < lo) | (g_area > hi)
        sort = np.argsort(np.where(gt_valid, ignore, 2), axis=1, kind="stable")  # ignored last
        take = lambda x, s=sort: np.take_along_axis(x, s, axis=1)  # noqa: E731
        matched, on_ignored = _match(
            np.take_along_axis(ious, sort[:, None, :], axis=2),
            take(ignore),
            take(crowd),
            take(gt_valid),
            num_dets,
        )
        outside = (d_area < lo) | (d_area > hi)
        dt_ignore = on_ignored | (~matched & outside[None])
        keep = det_valid.nonzero()  # image-major, then score rank: COCOeval's concatenation order
        m, ig = matched[:, keep[0], keep[1]], dt_ignore[:, keep[0], keep[1]]
        positives = int((gt_valid & ~ignore).sum())
        precision[:, :, a], recall[:, a] = _precision_recall(flat_scores, m & ~ig, ~m & ~ig, positives)
    return _summary(precision, recall)


def evaluate_keypoints_pycocotools(
    gt: KeypointGroundTruth, dt: KeypointDetections, sigmas: np.ndarray
) -> np.ndarray:
    """The same ten stats from pycocotools' ``COCOeval`` itself (the reference; builds its dicts)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = coco_dicts(gt, dt)
    return cocoeval_stats(COCO, COCOeval, dataset, results, sigmas) if results else -np.ones(10)


def cocoeval_stats(coco_cls, eval_cls, dataset: dict, results: list[dict], sigmas) -> np.ndarray:
    """Index, ``loadRes``, evaluate, accumulate and summarize with a pycocotools-like API
    (``pycocotools`` or ``faster_coco_eval``) -> ``stats`` (10,); their printing is swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        ev = eval_cls(coco_gt, coco_gt.loadRes(results), iouType="keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def coco_dicts(gt: KeypointGroundTruth, dt: KeypointDetections) -> tuple[dict, list[dict]]:
    """COCO GT dataset dict and results list (what pycocotools and faster-coco-eval take)."""
    images = [{"id": int(i), "width": 0, "height": 0} for i in np.unique(gt.images)]
    annotations = [
        {
            "id": n + 1,
            "image_id": int(gt.image_ids[n]),
            "category_id": 1,
            "bbox": gt.bboxes[n].tolist(),
            "area": float(gt.areas[n]),
            "iscrowd": int(gt.iscrowd[n]),
            "keypoints": gt.keypoints[n].reshape(-1).tolist(),
            "num_keypoints": int((gt.keypoints[n, :, 2] > 0).sum()),
        }
        for n in range(gt.image_ids.shape[0])
    ]
    categories = [{"id": 1, "name": "person", "supercategory": "person"}]
    results = [
        {
            "image_id": int(dt.image_ids[n]),
            "category_id": 1,
            "keypoints": dt.keypoints[n].reshape(-1).tolist(),
            "score": float(dt.scores[n]),
        }
        for n in range(dt.image_ids.shape[0])
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results
