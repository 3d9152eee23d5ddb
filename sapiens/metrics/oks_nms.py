"""OKS non-maximum suppression of top-down pose predictions (the published evaluation's ``oks_nms``):
within one image, drop a pose whose OKS with a higher-scored kept pose exceeds a threshold.

:func:`oks_nms` is the plain greedy loop for one image; :func:`batched_oks_nms` gives the same answer for
every image of a dataset at once, vectorised over all same-image pairs (what ``KeypointAP`` uses).
"""

from __future__ import annotations

import numpy as np

__all__ = ["batched_oks_nms", "oks_nms"]


def _oks_one_to_many(
    ref: np.ndarray, others: np.ndarray, ref_area: float | np.ndarray, areas: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """OKS between (K, 3) pose ``ref`` and (M, K, 3) ``others`` (or row-wise pairs when ``ref`` is
    (M, K, 3) too), using the mean of the two areas; every keypoint counts."""
    dx = others[..., 0] - ref[..., 0]
    dy = others[..., 1] - ref[..., 1]
    return _pair_oks(dx, dy, np.asarray(ref_area) + areas, sigmas)


def _pair_oks(dx: np.ndarray, dy: np.ndarray, area_sum: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """OKS-NMS similarity of M pose pairs from their offsets dx, dy (M, K) (overwritten) and the sums of
    their two areas (M,): mean_k exp(-(dx^2 + dy^2) / (2 sigma_k)^2 / (mean area + eps) / 2)."""
    np.multiply(dx, dx, out=dx)
    np.multiply(dy, dy, out=dy)
    dx += dy
    dx /= (2 * sigmas) ** 2
    dx /= (area_sum / 2 + np.spacing(1))[:, None]
    dx /= 2
    np.negative(dx, out=dx)
    return np.exp(dx, out=dx).mean(-1)


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


def batched_oks_nms(
    image_ids: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    sigmas: np.ndarray,
    thr: float,
) -> np.ndarray:
    """:func:`oks_nms` in every image at once: (N,) bool, True for the poses kept.

    Args:
        image_ids: (N,) image of each pose; keypoints (N, K, 3); scores, areas: (N,); sigmas: (K,).

    One pass per score rank (the most poses of one image), each over all images' pairs at that rank.
    """
    n = image_ids.shape[0]
    order = np.lexsort((np.arange(n), -scores, image_ids))  # per image, by score, stable
    owner = image_ids[order]
    first = np.searchsorted(owner, owner, side="left")
    rank = np.arange(n) - first
    later = np.searchsorted(owner, owner, side="right") - first - rank - 1  # same image, lower score
    # every pair (a, b) of sorted positions in one image with a before b, grouped by the rank of a
    pair_a = np.repeat(np.arange(n), later)
    pair_b = pair_a + 1 + np.arange(pair_a.shape[0]) - np.repeat(np.cumsum(later) - later, later)
    by_rank = np.argsort(rank[pair_a], kind="stable")
    pair_a, pair_b = pair_a[by_rank], pair_b[by_rank]
    ia, ib = order[pair_a], order[pair_b]
    over = np.empty(pair_a.shape[0], dtype=bool)
    x, y = (np.ascontiguousarray(keypoints[..., i]) for i in range(2))
    step = max(1, (1 << 18) // max(keypoints.shape[1], 1))
    for s in range(0, ia.shape[0], step):
        a, b = ia[s : s + step], ib[s : s + step]
        over[s : s + step] = _pair_oks(x[b] - x[a], y[b] - y[a], areas[a] + areas[b], sigmas) > thr
    suppressed = np.zeros(n, dtype=bool)
    bounds = np.searchsorted(rank[pair_a], np.arange(int(rank.max(initial=-1)) + 2))
    for r in range(bounds.shape[0] - 1):
        lo, hi = bounds[r], bounds[r + 1]
        hit = over[lo:hi] & ~suppressed[pair_a[lo:hi]]
        suppressed[pair_b[lo:hi][hit]] = True
    keep = np.zeros(n, dtype=bool)
    keep[order[~suppressed]] = True
    return keep
