"""SynthHumans generator: label consistency, determinism, COCO validity, CLI and contact sheet."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.synthhumans import RENDERED_PART_IDS, generate_dataset, render_sample, sample_rng
from data.synthhumans.__main__ import main as cli_main
from data.synthhumans.body import KEYPOINT_NAMES, build_person
from data.synthhumans.contact_sheet import write_contact_sheet
from data.synthhumans.render import Intrinsics, pixel_rays
from data.synthhumans.scene import _look_at
from sapiens.labels import load_keypoint_set

H, W, SEED, NUM = 96, 72, 7, 8


@pytest.fixture(scope="module")
def samples():
    return [render_sample(sample_rng(SEED, i), H, W, 3) for i in range(NUM)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, NUM, seed=SEED, height=H, width=W, max_people=3, progress=False)
    return root


def test_dense_labels_consistent(samples):
    for s in samples:
        fg = s["mask"] > 0
        assert set(np.unique(s["mask"])) <= {0, 255}
        assert np.array_equal(s["depth"] > 0, fg)
        assert np.array_equal(s["seg"] > 0, fg)
        assert np.array_equal(s["instance"] > 0, fg)
        assert set(np.unique(s["seg"]).tolist()) <= set(RENDERED_PART_IDS)
        normal = s["normal"]
        assert np.allclose(np.linalg.norm(normal[fg], axis=-1), 1.0, atol=1e-5)
        assert np.all(normal[~fg] == 0)
        cam = s["camera"]
        rays = pixel_rays(Intrinsics(cam["focal"], cam["cx"], cam["cy"], H, W))
        assert np.all(np.sum(normal[fg] * rays[fg], axis=-1) < 0)
        assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8


def test_keypoints_boxes_areas_consistent(samples):
    seen = {0: 0, 1: 0, 2: 0}
    for s in samples:
        assert len(s["persons"]) >= 1
        for i, person in enumerate(s["persons"]):
            own = s["instance"] == i + 1
            assert person["area"] == own.sum() > 0
            x, y, w, h = person["bbox"]
            rows, cols = np.nonzero(own)
            assert (x, y, x + w - 1, y + h - 1) == (
                cols.min(),
                rows.min(),
                cols.max(),
                rows.max(),
            )
            kps = np.concatenate([person["keypoints"], person["foot_kpts"]])
            assert kps.shape == (len(KEYPOINT_NAMES), 3)
            for kx, ky, v in kps:
                seen[int(v)] += 1
                if v == 0:
                    assert kx == 0 and ky == 0
                    continue
                assert 0 <= kx < W and 0 <= ky < H
                if v == 2:  # a visible keypoint lies on its own person's foreground
                    assert own[int(np.floor(ky)), int(np.floor(kx))]
    assert seen[2] > 0 and seen[1] > 0  # both visible and occluded keypoints occur


def test_files_match_in_memory_render(dataset, samples):
    for i, s in enumerate(samples):
        stem = f"{i + 1:06d}"
        assert np.array_equal(np.load(dataset / "depths" / f"{stem}.npy"), s["depth"])
        assert np.array_equal(np.load(dataset / "normals" / f"{stem}.npy"), s["normal"])
        seg = cv2.imread(str(dataset / "segs" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(seg, s["seg"])
        mask = cv2.imread(str(dataset / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, s["mask"])
        jpg = cv2.imread(str(dataset / "images" / f"{stem}.jpg"))[..., ::-1]
        assert np.abs(jpg.astype(int) - s["image"]).mean() < 12  # JPEG q92 of the same image


def test_deterministic_per_seed():
    a = render_sample(123, H, W, 3)
    b = render_sample(123, H, W, 3)
    c = render_sample(124, H, W, 3)
    for key in ("image", "seg", "depth", "normal", "mask", "instance"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


def test_workers_give_identical_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    generate_dataset(one, 4, seed=3, height=64, width=48, workers=1, progress=False)
    generate_dataset(two, 4, seed=3, height=64, width=48, workers=2, progress=False)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 4 * 7 + 1  # per image: jpg, seg, depth, normal, mask, intrinsics, pointmap
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_coco_json_self_evaluates_to_ap_one(dataset):
    ann_file = dataset / "annotations" / "person_keypoints.json"
    gt = COCO(str(ann_file))
    raw = json.loads(ann_file.read_text())
    assert raw["categories"][0]["keypoints"] == list(KEYPOINT_NAMES[:17])
    for ann in raw["annotations"]:
        assert len(ann["keypoints"]) == 51 and len(ann["foot_kpts"]) == 18
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert ann["num_keypoints"] == sum(v > 0 for v in ann["keypoints"][2::3])
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in raw["annotations"]
        if a["num_keypoints"] > 0
    ]
    assert dets
    ev = COCOeval(gt, gt.loadRes(dets), "keypoints")
    ev.params.kpt_oks_sigmas = load_keypoint_set("coco17").sigmas.astype(np.float64)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_left_is_anatomical_left():
    # A person at the origin facing -z (yaw pi) seen by a camera at -z: their left is image right.
    person = build_person(np.random.default_rng(0), np.zeros(3), np.pi, 0)
    cam_pos = np.array([0.0, 1.0, -4.0])
    rot = _look_at(cam_pos, np.array([0.0, 1.0, 0.0]), 0.0)
    kp = (person.keypoints - cam_pos) @ rot.T
    u = kp[:, 0] / kp[:, 2]
    for name in ("shoulder", "hip", "eye", "ear"):
        left, right = KEYPOINT_NAMES.index(f"left_{name}"), KEYPOINT_NAMES.index(f"right_{name}")
        assert u[left] > u[right], name
    shoulder = person.keypoints[KEYPOINT_NAMES.index("left_shoulder")]
    left_upper_arm = [p for p in person.primitives if p.part == 10]
    assert left_upper_arm and np.allclose(left_upper_arm[0].p0, shoulder)


def test_cli_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["--out", str(out), "--num", "3", "--height", "64", "--width", "48",
                     "--no-progress"]) == 0  # fmt: skip
    assert "images/s" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.jpg"))) == 3
    assert cli_main(["--out", str(out), "--num", "0"]) == 2
    sheet = write_contact_sheet(out, tmp_path / "sheet.png", num=3, per_row=2)
    image = cv2.imread(str(sheet))
    assert image.shape[0] == 2 * 64 and image.shape[1] == 2 * 4 * 48 + 6


def test_simple_style_has_plain_backgrounds_and_calmer_poses():
    """The demo's ``simple`` scenes: smoother backgrounds, limbs nearer the neutral pose."""

    def fg_mask(sample):
        return (sample["mask"] > 0).astype(np.uint8)

    def background_roughness(sample) -> float:
        gray = cv2.cvtColor(sample["image"], cv2.COLOR_RGB2GRAY).astype(np.float32)
        edges = np.abs(cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), 1.0), cv2.CV_32F))
        return float(edges[cv2.dilate(fg_mask(sample), np.ones((5, 5), np.uint8)) == 0].mean())

    def wrist_spread(samples) -> float:  # wrist-to-hip distance over torso length, spread
        ratios = []
        for s in samples:
            for p in s["persons"]:
                k = p["keypoints"]
                torso = np.linalg.norm(k[5, :2] - k[11, :2]) + 1e-6
                ratios.append(np.linalg.norm(k[9, :2] - k[11, :2]) / torso)
        return float(np.std(ratios))

    full = [render_sample(sample_rng(3, i), 128, 96, 1) for i in range(24)]
    simple = [render_sample(sample_rng(3, i), 128, 96, 1, "simple") for i in range(24)]
    assert np.mean([background_roughness(s) for s in simple]) < 0.5 * np.mean(
        [background_roughness(s) for s in full]
    )
    assert wrist_spread(simple) < wrist_spread(full)
    with pytest.raises(ValueError, match="scene style 'hard' unknown"):
        render_sample(0, 64, 48, 1, "hard")
