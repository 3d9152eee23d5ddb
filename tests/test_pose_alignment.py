"""Pose targets stay on the person under every training augmentation.

The image is replaced by the person's silhouette (white on black), so after the transform each labelled
keypoint decoded from its target heatmap must land on white pixels: this catches any mismatch between how
the crop image and the keypoints are warped (rotation sign, flip, half-body box), which point-only round
trips cannot see.
"""

import numpy as np
import pytest

from data.synthhumans import render_sample
from sapiens.codecs.udp_heatmap import UDPHeatmap
from sapiens.data.pose_transform import TopDownPoseTransform

AUGMENTATIONS = {
    "none": dict(rotate=0, rotate_prob=0, flip_prob=0, half_body_prob=0),
    "rotation": dict(rotate=80, rotate_prob=1.0, flip_prob=0, half_body_prob=0),
    "flip": dict(rotate=0, rotate_prob=0, flip_prob=1.0, half_body_prob=0),
    "half_body": dict(rotate=0, rotate_prob=0, flip_prob=0, half_body_prob=1.0),
    "all": dict(rotate=80, rotate_prob=1.0, flip_prob=1.0, half_body_prob=0.5),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_keypoint_targets_land_on_the_silhouette(name):
    transform = TopDownPoseTransform(
        "coco17",
        input_size=(128, 96),
        sigma=2.0,
        train=True,
        photometric=False,
        blur_prob=0.0,
        median_blur_prob=0.0,
        coarse_dropout_prob=0.0,
        seed=0,
        **AUGMENTATIONS[name],
    )
    codec = UDPHeatmap(input_size=(96, 128), heatmap_size=(24, 32), sigma=2.0)
    hits = []
    for seed in range(12):
        s = render_sample(seed, height=256, width=192, max_people=1)
        person = s["persons"][0]
        silhouette = np.repeat((s["instance"] > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
        sample = {
            "image": silhouette,
            "key": str(seed),
            "image_id": seed + 1,
            "width": 192,
            "height": 256,
            "persons": [
                {
                    "id": 0,
                    "bbox": np.asarray(person["bbox"], np.float32),
                    "area": person["area"],
                    "iscrowd": 0,
                    "keypoints": np.asarray(person["keypoints"], np.float32),
                }
            ],
        }
        for item in transform(sample):
            xy, _ = codec.decode(item["heatmaps"][None])
            crop = np.asarray(item["image"])[0]
            for k in np.flatnonzero(np.asarray(item["target_weight"]) > 0):
                x, y = np.round(xy[0, k]).astype(int)
                if 0 <= x < 96 and 0 <= y < 128:
                    hits.append(crop[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max() > 0)
    assert len(hits) > 50
    assert np.mean(hits) > 0.97  # a few occluded keypoints may sit just off the silhouette edge
