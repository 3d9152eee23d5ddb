"""KeypointAP: hand-computed OKS cases, perfect predictions, DDP-style gather, results JSON."""

import json

import numpy as np
import pytest

from sapiens.labels import load_keypoint_set
from sapiens.metrics.keypoint_ap import KeypointAP, oks_nms

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
    states = [{"gt": dict(m.ground_truth), "pred": list(m.predictions)} for m in (rank0, rank1)]

    def fake_all_gather(obj):
        assert obj["pred"] == states[0]["pred"]  # called with this rank's own state
        return states

    rank0.gather(fake_all_gather)
    assert len(rank0.predictions) == 6 and len(rank0.ground_truth) == 6
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
