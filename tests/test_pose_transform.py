"""Top-down geometry and the pose sample transform (tiny 64x48 inputs)."""

import json

import numpy as np
import pytest
import torch

from sapiens.data.normalize import normalize_images
from sapiens.data.pose_transform import IMAGE_MEAN, IMAGE_STD, TopDownPoseTransform
from sapiens.data.topdown import (
    bbox_xywh_to_center_scale,
    crop_to_image,
    transform_points,
    udp_affine_matrix,
    warp_image,
)
from sapiens.labels import load_keypoint_set

INPUT_HW = (64, 48)
SIGMA = 1.5  # heatmaps are 16x12


def _sample(rng, n_persons=2, k=17, image_id=3):
    h, w = 120, 160
    image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    persons = []
    for pid in range(n_persons):
        x, y = 10 + 70 * pid, 10
        kxy = rng.uniform([x + 5, y + 5], [x + 55, y + 95], size=(k, 2))
        v = np.full(k, 2.0)
        v[:3] = [0, 1, 2]
        persons.append(
            {
                "id": pid,
                "bbox": np.array([x, y, 60, 100], np.float32),
                "area": 4000.0,
                "keypoints": np.concatenate([kxy, v[:, None]], 1).astype(np.float32),
            }
        )
    return {
        "image": image,
        "key": "s",
        "image_id": image_id,
        "width": w,
        "height": h,
        "persons": persons,
    }


def test_center_scale_padding_and_aspect():
    center, scale = bbox_xywh_to_center_scale([10, 20, 30, 100], aspect_ratio=0.75)
    np.testing.assert_allclose(center, [25, 70])
    assert scale[0] / scale[1] == pytest.approx(0.75)
    assert scale[1] == pytest.approx(125.0) and scale[0] >= 30 * 1.25
    c2, s2 = bbox_xywh_to_center_scale(np.array([[0, 0, 200, 10]]), aspect_ratio=0.75)
    assert s2.shape == (1, 2) and s2[0, 0] == pytest.approx(250.0)


@pytest.mark.parametrize("rot", [0.0, 30.0, -75.0])
def test_inverse_maps_crop_points_back_to_image(rot):
    rng = np.random.default_rng(0)
    center, scale = np.array([80.0, 60.0]), np.array([90.0, 120.0])
    pts = rng.uniform(0, 150, size=(7, 2)).astype(np.float32)
    matrix = udp_affine_matrix(center, scale, rot, (48, 64))
    back = crop_to_image(transform_points(pts, matrix), center, scale, (48, 64), rot)
    np.testing.assert_allclose(back, pts, atol=1e-3)
    # region corners land on the first/last pixel centres when unrotated
    m0 = udp_affine_matrix(center, scale, 0.0, (48, 64))
    corners = transform_points(np.array([[35.0, 0.0], [125.0, 120.0]]), m0)
    np.testing.assert_allclose(corners, [[0, 0], [47, 63]], atol=1e-4)


def test_warp_moves_pixels_like_points():
    image = np.zeros((100, 120), np.float32)
    image[40, 70] = 1.0
    matrix = udp_affine_matrix((60, 50), (60, 80), 0.0, (31, 41))  # 2 crop px per image px
    crop = warp_image(image, matrix, (31, 41))
    y, x = np.unravel_index(crop.argmax(), crop.shape)
    np.testing.assert_allclose(transform_points(np.array([70.0, 40.0]), matrix), [x, y])


def test_val_outputs_shapes_weights_and_geometry():
    rng = np.random.default_rng(1)
    sample = _sample(rng)
    tf = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, train=False)
    items = tf(sample)
    assert len(items) == 2
    item = items[0]
    assert item["image"].shape == (3, 64, 48) and item["image"].dtype == torch.uint8
    assert item["heatmaps"].shape == (17, 16, 12) and item["target_weight"].shape == (17,)
    assert item["center"].shape == (2,) and item["scale"].shape == (2,)
    assert item["image_id"] == 3 and item["bbox_score"] == 1.0 and item["area"] == 4000.0
    assert item["target_weight"][0] == 0 and torch.all(item["target_weight"][1:] == 1)
    assert torch.all(item["heatmaps"][0] == 0)
    # on the device the uint8 crop becomes (x - mean) / std
    normalised = normalize_images(item["image"]).numpy()
    rgb = item["image"].numpy().astype(np.float32)
    expected = (rgb - IMAGE_MEAN[:, None, None]) / IMAGE_STD[:, None, None]
    np.testing.assert_allclose(normalised, expected, rtol=1e-6, atol=1e-6)
    # decoding the targets and inverting the crop recovers the GT keypoints
    decoded, _ = tf.codec.decode(item["heatmaps"][None])
    back = crop_to_image(decoded[0], item["center"].numpy(), item["scale"].numpy(), (48, 64))
    gt = sample["persons"][0]["keypoints"]
    err = np.abs(back - gt[:, :2])[1:]
    assert err.max() < 1.0  # < 1 image px (the crop is ~2.6 image px per input px)


def test_train_min_keypoints_and_determinism():
    rng = np.random.default_rng(2)
    sample = _sample(rng)
    sample["persons"][1]["keypoints"][:, 2] = 0
    sample["persons"][1]["keypoints"][:4, 2] = 2
    tf = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, train=True, min_keypoints=5, seed=7)
    items = tf(sample)
    assert len(items) == 1
    again = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, train=True, min_keypoints=5, seed=7)(sample)
    assert torch.equal(items[0]["image"], again[0]["image"])
    assert items[0]["heatmaps"].shape == (17, 16, 12)


def test_train_flip_swaps_keypoints():
    rng = np.random.default_rng(3)
    sample = _sample(rng, n_persons=1)
    kset = load_keypoint_set("coco17")
    tf = TopDownPoseTransform(
        kset,
        INPUT_HW,
        sigma=SIGMA,
        train=True,
        flip_prob=1.0,
        half_body_prob=0.0,
        shift_prob=0.0,
        scale_range=(1.0, 1.0),
        rotate_prob=0.0,
        photometric=False,
        blur_prob=0.0,
        median_blur_prob=0.0,
        coarse_dropout_prob=0.0,
        seed=0,
    )
    item = tf(sample)[0]
    weights = item["target_weight"].numpy()
    # keypoint 1 is left_eye (v=1) and 2 right_eye (v=2); keypoint 0 (v=0) stays itself
    assert weights[0] == 0 and weights[kset.flip_index[1]] == 1
    decoded, _ = tf.codec.decode(item["heatmaps"][None])
    unflipped = decoded[0][kset.flip_index].copy()
    unflipped[:, 0] = 48 - 1 - unflipped[:, 0]
    back = crop_to_image(unflipped, item["center"].numpy(), item["scale"].numpy(), (48, 64))
    gt = sample["persons"][0]["keypoints"]
    assert np.abs(back - gt[:, :2])[1:].max() < 1.0
    # the image itself is mirrored: compare with the un-flipped val crop
    val = TopDownPoseTransform(kset, INPUT_HW, sigma=SIGMA, train=False)(sample)[0]
    # (cv2's fixed-point bilinear warp may round a few pixels one grey level apart)
    diff = np.abs(item["image"].numpy().astype(np.float32) - val["image"].numpy()[..., ::-1])
    assert diff.max() <= 1.01 and (diff > 0.01).mean() < 0.01


def test_train_augmentations_run_and_keep_shapes():
    rng = np.random.default_rng(4)
    tf = TopDownPoseTransform(
        "coco17",
        INPUT_HW,
        sigma=SIGMA,
        train=True,
        half_body_prob=1.0,
        rotate_prob=1.0,
        shift_prob=1.0,
        seed=1,
    )
    for _ in range(5):
        for item in tf(_sample(rng)):
            assert item["image"].shape == (3, 64, 48)
            assert torch.isfinite(item["heatmaps"]).all()
            assert item["scale"][0] / item["scale"][1] == pytest.approx(48 / 64, rel=1e-4)


def test_val_with_detection_boxes(tmp_path):
    rng = np.random.default_rng(5)
    dets = [
        {"image_id": 3, "bbox": [10, 10, 60, 100], "score": 0.9, "category_id": 1},
        {"image_id": 3, "bbox": [80, 10, 60, 100], "score": 0.2, "category_id": 1},
        {"image_id": 3, "bbox": [80, 10, 60, 100], "score": 0.95, "category_id": 2},
        {"image_id": 4, "bbox": [0, 0, 10, 10], "score": 0.99, "category_id": 1},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    tf = TopDownPoseTransform(
        "coco17", INPUT_HW, sigma=SIGMA, train=False, bbox_file=str(path), bbox_score_thr=0.5
    )
    items = tf(_sample(rng))
    assert len(items) == 1 and items[0]["bbox_score"] == pytest.approx(0.9)
    assert items[0]["area"] == pytest.approx(6000.0)
    assert torch.all(items[0]["target_weight"] == 0)


def test_bad_inputs():
    rng = np.random.default_rng(6)
    tf = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, train=False)
    with pytest.raises(ValueError, match="image"):
        tf({**_sample(rng), "image": np.zeros((10, 10), np.uint8)})
    with pytest.raises(ValueError, match="coco17"):
        tf(_sample(rng, k=23))
    with pytest.raises(ValueError, match="heatmap_stride"):
        TopDownPoseTransform("coco17", (62, 48))
    with pytest.raises(FileNotFoundError):
        TopDownPoseTransform("coco17", INPUT_HW, train=False, bbox_file="/nonexistent.json")


def test_blur_and_coarse_dropout_follow_the_published_recipe():
    rng = np.random.default_rng(5)
    sample = _sample(rng, n_persons=1)
    plain = dict(
        flip_prob=0.0, half_body_prob=0.0, shift_prob=0.0, scale_range=(1.0, 1.0), rotate_prob=0.0,
        photometric=False, seed=0,
    )  # fmt: skip
    off = dict(blur_prob=0.0, median_blur_prob=0.0, coarse_dropout_prob=0.0)
    base = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, **plain, **off)(sample)[0]
    dropped = TopDownPoseTransform(
        "coco17", INPUT_HW, sigma=SIGMA, **plain, **{**off, "coarse_dropout_prob": 1.0}
    )
    item = dropped(sample)[0]
    changed = (item["image"] != base["image"]).any(dim=0).numpy()
    rows, cols = np.nonzero(changed)
    # one rectangle, 0.2-0.4 of the 64x48 crop in each direction, filled with zeros
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 0.2 * 64 - 1 <= h <= 0.4 * 64 + 1 and 0.2 * 48 - 1 <= w <= 0.4 * 48 + 1
    hole = item["image"][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert (hole == 0).all()
    torch.testing.assert_close(item["heatmaps"], base["heatmaps"])  # targets untouched
    blurred = TopDownPoseTransform("coco17", INPUT_HW, sigma=SIGMA, **plain, **{**off, "blur_prob": 1.0})(
        sample
    )[0]
    assert not torch.equal(blurred["image"], base["image"])

    # a box blur removes high frequencies: neighbouring pixels differ less
    def roughness(img):
        return img.float().diff(dim=-1).abs().mean()

    assert roughness(blurred["image"]) < roughness(base["image"])
    with pytest.raises(ValueError, match="coarse_dropout_size"):
        TopDownPoseTransform("coco17", INPUT_HW, coarse_dropout_size=(0.5, 0.2))
