"""How long does OKS keypoint AP take on a val set: ours against pycocotools and faster-coco-eval?

    python -m experiments.benchmarks.keypoint_eval --images 5000 --sets goliath308 coco17

Synthetic val set: per image (640x480) 1-3 people with a random box; each keypoint uniform in its
box, 10 % unlabelled (v = 0). Predictions = GT + Gaussian noise of std ``u * 2 sigma_k sqrt(area)``
(u ~ U(0.1, 1.0) per person, sigma_k the set's OKS sigma), keypoint scores U(0.3, 1), box score 1.

Timed, in one process on the same scored predictions:
- ``KeypointAP``: registering GT + predictions (``add``) and ``compute()`` (rescoring, OKS-NMS and the
  vectorised evaluation of :mod:`sapiens.metrics.oks_eval`): what a validation pays;
- ``oks_eval``: :func:`~sapiens.metrics.oks_eval.evaluate_keypoints` alone, from arrays;
- ``COCOeval``: pycocotools itself, from its COCO dicts (index, ``loadRes``, evaluate, accumulate,
  summarize; building the dicts is not counted);
- ``faster-coco-eval``: the same with ``faster_coco_eval.COCOeval_faster`` (when installed).
The speed-up is COCOeval's time over KeypointAP's ``compute()``; ``max |diff|`` is the largest
difference of the ten stats (AP ... ARl) from COCOeval's, for ours and faster-coco-eval's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from experiments.benchmarks._common import markdown_table
from sapiens.labels import load_keypoint_set
from sapiens.metrics.keypoint_ap import STAT_NAMES, KeypointAP
from sapiens.metrics.oks_eval import coco_dicts, cocoeval_stats, evaluate_keypoints

IMAGE_W, IMAGE_H = 640, 480


def synthetic_val_set(
    num_images: int, sigmas: np.ndarray, rng: np.random.Generator
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """GT samples (the ``add_ground_truth`` dict format) and stacked predictions.

    Returns:
        samples: one dict per image with ``image_id``, ``width``, ``height``, ``persons``.
        preds: ``image_ids`` (N,) int64, ``keypoints`` (N, K, 3) float64, ``bbox_scores`` (N,),
            ``areas`` (N,) for N people in total.
    """
    k = sigmas.shape[0]
    samples, ids, kpts, areas = [], [], [], []
    for image_id in range(num_images):
        persons = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(60, 300), rng.uniform(100, 400)
            x, y = rng.uniform(0, IMAGE_W - w), rng.uniform(0, IMAGE_H - h)
            gt = np.zeros((k, 3))
            gt[:, 0] = rng.uniform(x, x + w, k)
            gt[:, 1] = rng.uniform(y, y + h, k)
            gt[:, 2] = np.where(rng.random(k) < 0.9, 2, 0)
            gt[gt[:, 2] == 0, :2] = 0
            area = w * h
            persons.append({"bbox": [x, y, w, h], "area": area, "keypoints": gt})
            std = rng.uniform(0.1, 1.0) * 2 * sigmas * np.sqrt(area)
            pred = np.empty((k, 3))
            pred[:, :2] = gt[:, :2] + rng.normal(0, 1, (k, 2)) * std[:, None]
            pred[:, 2] = rng.uniform(0.3, 1.0, k)
            ids.append(image_id)
            kpts.append(pred)
            areas.append(area)
        samples.append({"image_id": image_id, "width": IMAGE_W, "height": IMAGE_H, "persons": persons})
    preds = {
        "image_ids": np.asarray(ids, dtype=np.int64),
        "keypoints": np.stack(kpts),
        "bbox_scores": np.ones(len(ids)),
        "areas": np.asarray(areas),
    }
    return samples, preds


def _timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def time_evaluation(keypoint_set: str, num_images: int, seed: int = 0) -> dict[str, float]:
    """Build the synthetic set for ``keypoint_set`` and time every evaluator on it."""
    kset = load_keypoint_set(keypoint_set)
    sigmas = np.asarray(kset.sigmas, np.float64)
    samples, preds = synthetic_val_set(num_images, sigmas, np.random.default_rng(seed))
    metric = KeypointAP(kset)
    start = time.perf_counter()
    for sample in samples:
        metric.add_ground_truth(sample)
    metric.add_predictions(**preds)
    added = time.perf_counter()
    result = metric.compute()
    done = time.perf_counter()
    gt, dets = metric.ground_truth_arrays(), metric.scored_predictions()
    ours_s, ours = _timed(lambda: evaluate_keypoints(gt, dets, sigmas))
    dataset, results = coco_dicts(gt, dets)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_s, reference = _timed(lambda: cocoeval_stats(COCO, COCOeval, dataset, results, sigmas))
    row = {
        "keypoints": kset.num_keypoints,
        "people": len(preds["image_ids"]),
        "add_s": added - start,
        "compute_s": done - added,
        "oks_eval_s": ours_s,
        "cocoeval_s": coco_s,
        "AP": result["AP"],
        "diff": float(np.abs(ours - reference).max()),
        "diff_compute": max(abs(result[n] - v) for n, v in zip(STAT_NAMES, reference, strict=True)),
    }
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        row["faster_s"], row["faster_diff"] = float("nan"), float("nan")
    else:
        dataset, results = coco_dicts(gt, dets)  # loadRes writes into its results
        faster_s, faster = _timed(
            lambda: cocoeval_stats(FasterCOCO, COCOeval_faster, dataset, results, sigmas)
        )
        row["faster_s"], row["faster_diff"] = faster_s, float(np.abs(faster - reference).max())
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print a table and return its rows."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.keypoint_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["goliath308", "coco17"],
        help="keypoint sets (sapiens.labels names or YAML paths)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be >= 1")
    rows = []
    for name in args.sets:
        row = {"set": name, **time_evaluation(name, args.images, args.seed)}
        rows.append(row)
        faster = (
            f"faster-coco-eval {row['faster_s']:.2f} s"
            if row["faster_s"] == row["faster_s"]
            else "faster-coco-eval not installed (pip install faster-coco-eval)"
        )
        print(
            f"{name}: {row['keypoints']} keypoints, {args.images} images, {row['people']} people: "
            f"KeypointAP add {row['add_s']:.2f} s + compute {row['compute_s']:.2f} s "
            f"(oks_eval alone {row['oks_eval_s']:.2f} s); COCOeval {row['cocoeval_s']:.2f} s; {faster}; "
            f"speed-up {row['cocoeval_s'] / row['compute_s']:.1f}x (AP {row['AP']:.3f})",
            flush=True,
        )
    table = [
        [
            r["set"],
            r["keypoints"],
            args.images,
            r["people"],
            f"{r['add_s']:.2f}",
            f"{r['compute_s']:.3f}",
            f"{r['oks_eval_s']:.3f}",
            f"{r['cocoeval_s']:.2f}",
            f"{r['faster_s']:.2f}",
            f"{r['cocoeval_s'] / r['compute_s']:.1f}",
            f"{max(r['diff'], r['diff_compute']):.1e}",
            f"{r['faster_diff']:.1e}",
            f"{r['AP']:.3f}",
        ]
        for r in rows
    ]
    header = ["set", "K", "images", "people", "add s", "compute s", "oks_eval s", "COCOeval s"]
    header += ["faster-coco-eval s", "speed-up", "max |diff|", "faster max |diff|", "AP (sanity)"]
    print()
    print(markdown_table(header, table))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
