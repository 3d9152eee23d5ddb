"""KeypointAP: hand-computed OKS cases, perfect predictions, DDP-style gather, results JSON, and the
vectorised evaluation against pycocotools' COCOeval on randomised cases."""

import json

import numpy as np
import pytest

from sapiens.labels import KeypointSet, load_keypoint_set
from sapiens.metrics.keypoint_ap import KeypointAP
from sapiens.metrics.oks_nms import batched_oks_nms, oks_nms

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _person(rng, k, area=150.0 * 250.0 * 0.6, n_hidden=0):
    xy = rng.uniform([100, 50], [250, 300], size=(k, 2))
    v = np.full(k, 2.0)
    v[rng.choice(k, n_hidden, replace=False)] = 0
    kpts = np.concatenate([xy, v[:, None]], 1).astype(np.float32)
    return {"bbox": np.array([90, 40, 170, 270], np.float32), "area": area, "keypoints": kpts}


def _gt_sample(image_id, persons):
    return {"image_id": image_id, "width": 400, "height": 400, "persons": persons}


@pytest.mark.parametrize("offset", [4.0, 9.0, 14.0, 25.0])
def test_single_pair_matches_hand_computed_oks(offset):
    kset = load_keypoint_set("coco17")
    rng = np.random.default_rng(0)
    gt = _person(rng, 17)
    metric = KeypointAP(kset, score_mode="bbox", nms_thr=None)
    metric.add_ground_truth(_gt_sample(1, [gt]))
    pred = gt["keypoints"].copy()
    pred[:, 0] += offset  # every keypoint shifted by `offset` px along x
    pred[:, 2] = 0.9
    metric.add_predictions([1], pred[None], [0.8], [1.0])
    # OKS = mean_k exp(-d^2 / (2 * area * (2 sigma_k)^2)) over labelled GT keypoints
    oks = np.mean(np.exp(-(offset**2) / (2 * gt["area"] * (2 * kset.sigmas.astype(float)) ** 2)))
    result = metric.compute()
    # One GT, one detection: precision is 1 at every OKS threshold the pair passes, else 0.
    assert result["AP"] == pytest.approx(np.mean(oks >= THRESHOLDS), abs=1e-6)
    assert result["AP50"] == pytest.approx(float(oks >= 0.5))
    assert result["AP75"] == pytest.approx(float(oks >= 0.75))
    assert np.min(np.abs(oks - THRESHOLDS)) > 0.005  # the case is not ambiguous
    assert result["AR"] == pytest.approx(np.mean(oks >= THRESHOLDS), abs=1e-6)
    assert result["APl"] == pytest.approx(result["AP"])  # area 22500 > 96^2: a large object
    assert result["APm"] == -1.0


def test_perfect_predictions_give_ap_one_and_json(tmp_path):
    kset = load_keypoint_set("coco_wholebody133")
    rng = np.random.default_rng(1)
    metric = KeypointAP(kset, part_groups=["body", "face", "left_hand"])
    for image_id in range(5):
        persons = [_person(rng, 133, n_hidden=20) for _ in range(2)]
        metric.add_ground_truth(_gt_sample(image_id, persons))
        metric.add_ground_truth(_gt_sample(image_id, []))  # a repeated id is ignored
        kpts = np.stack([p["keypoints"] for p in persons]).copy()
        kpts[..., 2] = 0.95
        metric.add_predictions([image_id] * 2, kpts, [1.0, 1.0], [4e4, 4e4])
    out = tmp_path / "preds.json"
    result = metric.compute(out)
    assert result["AP"] == pytest.approx(1.0) and result["AR"] == pytest.approx(1.0)
    assert result["AP/body"] == pytest.approx(1.0) and result["AP/left_hand"] == pytest.approx(1.0)
    written = json.loads(out.read_text())
    assert len(written) == 10 and len(written[0]["keypoints"]) == 133 * 3
    assert {"image_id", "category_id", "keypoints", "score"} <= set(written[0])


def test_gather_across_fake_ranks_equals_single_process():
    kset = load_keypoint_set("coco17")
    rng = np.random.default_rng(2)
    single, rank0, rank1 = (KeypointAP(kset) for _ in range(3))
    for image_id in range(6):
        gt = [_person(rng, 17, n_hidden=3)]
        pred = gt[0]["keypoints"].copy()
        pred[:, :2] += rng.normal(0, 6, size=(17, 2))
        pred[:, 2] = rng.uniform(0.3, 1.0, 17)
        for m in (single, rank0 if image_id % 2 else rank1):
            m.add_ground_truth(_gt_sample(image_id, gt))
            m.add_predictions([image_id], pred[None], [0.9], [3e4])
    # a padded sampler repeats an item on the other rank: it must not count twice
    rank1.add_ground_truth(_gt_sample(5, rank0.ground_truth[5]["persons"]))
    rank1.predictions.append(dict(rank0.predictions[-1]))
    states = []
    for m in (rank0, rank1):  # what each rank hands to all_gather_object
        m.gather(lambda obj: states.append(obj) or [obj])
    assert [len(s["pred"]["image_ids"]) for s in states] == [3, 4]

    def fake_all_gather(obj):
        assert np.array_equal(obj["pred"]["keypoints"], states[0]["pred"]["keypoints"])  # own state
        return states

    rank0.gather(fake_all_gather)
    assert rank0.num_predictions == 6 and len(rank0.ground_truth) == 6
    expected = single.compute()
    assert 0.0 < expected["AP"] < 1.0
    assert rank0.compute() == pytest.approx(expected)


def test_rescoring_and_nms():
    kset = load_keypoint_set("coco17")
    rng = np.random.default_rng(3)
    gt = _person(rng, 17)
    kpts = gt["keypoints"].copy()
    kpts[:, 2] = np.where(np.arange(17) < 10, 0.9, 0.1)  # 7 scores below the 0.2 threshold
    dup = kpts.copy()
    dup[:, :2] += 0.5
    keep = oks_nms(np.stack([kpts, dup]), np.array([0.5, 0.9]), np.array([3e4, 3e4]), kset.sigmas, 0.9)
    assert keep == [1]
    metric = KeypointAP(kset)
    metric.add_ground_truth(_gt_sample(7, [gt]))
    metric.add_predictions([7, 7], np.stack([kpts, dup]), [0.5, 0.6], [3e4, 3e4])
    scored = metric.scored_results()
    assert len(scored) == 1  # the near-duplicate is suppressed
    assert scored[0]["score"] == pytest.approx(0.6 * 0.9)  # box score x mean of scores > 0.2
    assert metric.scored_predictions().scores.tolist() == [scored[0]["score"]]  # the same, as arrays


def test_scored_results_keep_boxes_and_can_include_images_without_ground_truth():
    """What predict writes: COCO results with the person boxes, on images nobody annotated."""
    kset = load_keypoint_set("coco17")
    rng = np.random.default_rng(4)
    metric = KeypointAP(kset)
    poses = np.stack([_person(rng, 17)["keypoints"] for _ in range(3)])
    poses[..., 2] = 0.9
    metric.add_predictions(
        [5, 9, 5], poses, [0.4, 0.9, 0.8], [3e4] * 3, boxes=[[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    )
    metric.add_predictions([9], poses[:1], [0.5], [3e4])  # no box
    with pytest.warns(UserWarning, match="4 predictions on images without registered GT"):
        assert metric.scored_results() == []
    results = metric.scored_results(with_ground_truth_only=False)
    assert [(r["image_id"], round(r["score"], 2)) for r in results] == [
        (5, 0.72),
        (5, 0.36),
        (9, 0.81),
        (9, 0.45),
    ]
    assert [r.get("bbox") for r in results] == [[9, 9, 9, 9], [1, 2, 3, 4], [5, 6, 7, 8], None]
    assert len(results[0]["keypoints"]) == 17 * 3


def test_errors_and_empty_predictions():
    kset = load_keypoint_set("coco17")
    metric = KeypointAP(kset)
    with pytest.raises(ValueError, match="no ground truth"):
        metric.compute()
    with pytest.raises(ValueError, match=r"\(N, 17, 3\)"):
        metric.add_predictions([0], np.zeros((1, 16, 3)), [1.0], [1.0])
    metric.add_ground_truth(_gt_sample(0, [_person(np.random.default_rng(0), 17)]))
    with pytest.warns(UserWarning, match="no predictions"):
        assert metric.compute()["AP"] == 0.0
    with pytest.raises(ValueError, match="part_groups"):
        KeypointAP(kset, part_groups=["face"])


# ---------------------------------------------------------------------- randomised cases vs COCOeval
def _random_case(rng: np.random.Generator):
    """A small random dataset exercising COCOeval's corner cases: small / medium / large people,
    crowd GT, GT without labelled keypoints, duplicated GT and predictions (OKS and score ties),
    perfect predictions (OKS 1), images without predictions or without people, > 20 predictions
    on an image, and score ties from a few discrete box and keypoint scores."""
    k = int(rng.integers(3, 18))
    sigmas = rng.uniform(0.02, 0.1, k)
    samples, ids, kpts, scores, areas = [], [], [], [], []
    for image in range(int(rng.integers(5, 30))):
        image_id = image * 7 + 3
        persons = []
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.choice([20.0, 50.0, 80.0, 150.0, 300.0]) * rng.uniform(0.5, 1.5, 2)
            x, y = rng.uniform(0, 400, 2)
            gt = np.zeros((k, 3))
            gt[:, 0], gt[:, 1] = rng.uniform(x, x + w, k), rng.uniform(y, y + h, k)
            labelled = rng.random(k) < rng.choice([0.0, 0.5, 0.9, 1.0], p=[0.15, 0.25, 0.3, 0.3])
            gt[:, 2] = np.where(labelled, 2, 0)
            gt[~labelled, :2] = 0
            area = float(w * h * rng.uniform(0.4, 1.0))
            crowd = int(rng.random() < 0.1)
            persons.append({"bbox": [x, y, w, h], "area": area, "keypoints": gt, "iscrowd": crowd})
        if persons and rng.random() < 0.15:
            persons.append(dict(persons[0]))
        samples.append({"image_id": image_id, "width": 640, "height": 480, "persons": persons})
        for _ in range(int(rng.choice([0, 1, 3, 8, 25], p=[0.15, 0.3, 0.3, 0.15, 0.1]))):
            if persons and rng.random() < 0.7:
                p = persons[int(rng.integers(len(persons)))]
                noise = rng.normal(0, 1, (k, 2)) * rng.uniform(0.0, 0.1) * np.sqrt(p["area"])
                xy = p["keypoints"][:, :2] + (0 if rng.random() < 0.1 else noise)
            else:
                xy = rng.uniform(0, 500, (k, 2))
            copies = 2 if rng.random() < 0.1 else 1
            pose = np.concatenate([xy, rng.choice([0.1, 0.3, 0.6, 0.9], k)[:, None]], 1)
            score, area = float(rng.choice([0.5, 0.7, 0.9, 1.0])), float(rng.uniform(500, 5e4))
            for _ in range(copies):
                ids.append(image_id), kpts.append(pose), scores.append(score), areas.append(area)
    preds = (np.asarray(ids), np.asarray(kpts).reshape(-1, k, 3), np.asarray(scores), np.asarray(areas))
    return sigmas, samples, preds


@pytest.mark.parametrize("seed", range(8))
def test_batched_oks_nms_equals_per_image_nms(seed):
    rng = np.random.default_rng(100 + seed)
    sigmas, _, (ids, kpts, scores, areas) = _random_case(rng)
    thr = float(rng.choice([0.3, 0.5, 0.9]))
    keep = batched_oks_nms(ids, kpts, scores, areas, sigmas, thr)
    expected = np.zeros(len(ids), dtype=bool)
    for image_id in np.unique(ids):
        idx = np.flatnonzero(ids == image_id)
        expected[idx[oks_nms(kpts[idx], scores[idx], areas[idx], sigmas, thr)]] = True
    assert 0 < keep.sum() <= len(ids)
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(
    ("score_mode", "nms_thr"), [("bbox", None), ("bbox_keypoint", None), ("bbox_keypoint", 0.9)]
)
def test_vectorised_evaluation_equals_cocoeval(seed, score_mode, nms_thr):
    """Every stat of the NumPy backend equals pycocotools' COCOeval on the same inputs."""
    sigmas, samples, preds = _random_case(np.random.default_rng(seed))
    groups = {"first": list(range(0, len(sigmas), 2))}
    k = len(sigmas)
    kset = KeypointSet("random", [f"k{i}" for i in range(k)], np.arange(k), [], sigmas, None, None, groups)
    results = {}
    for backend in ("numpy", "pycocotools"):
        metric = KeypointAP(kset, score_mode, nms_thr=nms_thr, part_groups=["first"], backend=backend)
        for sample in samples:
            metric.add_ground_truth(sample)
        metric.add_predictions(*preds)
        results[backend] = metric.compute()
    assert results["numpy"].keys() == results["pycocotools"].keys()
    for name, expected in results["pycocotools"].items():
        assert results["numpy"][name] == pytest.approx(expected, abs=1e-6), name
    assert any(v not in (-1.0, 0.0, 1.0) for v in results["numpy"].values())  # a non-trivial case
