"""coco / seg / depth / normal converters: exact round trips through shards and bad-input errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import cv2
import numpy as np
import pytest
import simplejpeg

from data.converters.coco import convert_coco
from data.converters.dense import convert_dense
from data.converters.seg import convert_seg
from data.make_shards import main as make_shards_main
from data.synthhumans import generate_dataset
from sapiens.data.readers import read_depth, read_normal, read_pose, read_seg

NUM = 6
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate_dataset(root, NUM, seed=11, height=64, width=48, max_people=3, progress=False)
    return root


@pytest.fixture
def raw_copy(raw, tmp_path):
    """A private copy of the raw dataset that a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(raw, dst)
    return dst


def read_tar_samples(folder) -> dict[str, dict[str, bytes]]:
    """All samples of the shards in a folder: key -> {ext: bytes} (plain tar reading)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


@pytest.mark.parametrize("keypoint_set, fields", [
    ("body17", ["keypoints"]), ("body_foot23", ["keypoints", "foot_kpts"]),
])  # fmt: skip
def test_coco_round_trip(raw, tmp_path, keypoint_set, fields):
    ann_file = raw / "annotations" / "person_keypoints.json"
    convert_coco(ann_file, raw / "images", tmp_path, keypoint_set, max_count=4, **QUIET)
    samples = read_tar_samples(tmp_path)
    coco = json.loads(ann_file.read_text())
    assert len(samples) == NUM and len(list(tmp_path.glob("*.tar"))) == 2
    for entry in coco["images"]:
        sample = samples[f"{entry['id']:012d}"]
        source = (raw / "images" / entry["file_name"]).read_bytes()
        assert np.array_equal(decode(sample["jpg"]), decode(source))
        meta = json.loads(sample["json"])
        assert (meta["image_id"], meta["width"], meta["height"]) == (entry["id"], 48, 64)
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        assert [p["id"] for p in meta["persons"]] == [a["id"] for a in anns]
        for person, ann in zip(meta["persons"], anns, strict=True):
            expected = np.concatenate([np.reshape(ann[f], (-1, 3)) for f in fields])
            assert np.array_equal(np.array(person["keypoints"]), expected)
            assert person["bbox"] == ann["bbox"] and person["area"] == ann["area"]
        decoded = read_pose(sample)  # the training-side reader accepts the sample
        assert decoded["persons"][0]["keypoints"].shape == (len(expected), 3)


def test_seg_depth_normal_round_trip(raw, tmp_path):
    convert_seg(raw / "images", raw / "segs", tmp_path / "seg", **QUIET)
    convert_dense("depth", raw / "images", raw / "depths", tmp_path / "depth", raw / "masks", **QUIET)
    convert_dense("normal", raw / "images", raw / "normals", tmp_path / "normal", **QUIET)
    seg = read_tar_samples(tmp_path / "seg")
    depth = read_tar_samples(tmp_path / "depth")
    normal = read_tar_samples(tmp_path / "normal")
    assert len(seg) == len(depth) == len(normal) == NUM
    for i in range(1, NUM + 1):
        stem = f"{i:06d}"
        source = decode((raw / "images" / f"{stem}.jpg").read_bytes())
        mask = cv2.imread(str(raw / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        s = read_seg(seg[stem])
        assert np.array_equal(s["image"], source)
        assert np.array_equal(s["seg"], cv2.imread(str(raw / "segs" / f"{stem}.png"), -1))
        d = read_depth(depth[stem])
        assert np.array_equal(d["depth"], np.load(raw / "depths" / f"{stem}.npy"))
        assert np.array_equal(d["mask"], mask > 0)
        n = read_normal(normal[stem])
        assert np.array_equal(n["normal"], np.load(raw / "normals" / f"{stem}.npy"))
        assert np.array_equal(n["mask"], mask > 0)  # derived from the normals: same foreground


def test_missing_label_file(raw_copy, tmp_path):
    (raw_copy / "segs" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002.png"):
        convert_seg(raw_copy / "images", raw_copy / "segs", tmp_path / "a", **QUIET)
    summary = convert_seg(raw_copy / "images", raw_copy / "segs", tmp_path / "b", skip_bad=True, **QUIET)
    assert (summary.samples, summary.skipped) == (NUM - 1, 1)


def test_size_mismatch(raw_copy, tmp_path):
    cv2.imwrite(str(raw_copy / "segs" / "000003.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"000003\.png.*size"):
        convert_seg(raw_copy / "images", raw_copy / "segs", tmp_path / "a", **QUIET)
    np.save(raw_copy / "depths" / "000004.npy", np.zeros((64, 47), np.float32))
    with pytest.raises(ValueError, match=r"000004\.npy.*shape"):
        convert_dense("depth", raw_copy / "images", raw_copy / "depths", tmp_path / "b", **QUIET)


def test_unknown_class_id(raw_copy, tmp_path):
    label = cv2.imread(str(raw_copy / "segs" / "000005.png"), cv2.IMREAD_UNCHANGED)
    label[0, :3] = [40, 28, 255]  # 40 and 28 are invalid for 28 classes; 255 is ignore
    cv2.imwrite(str(raw_copy / "segs" / "000005.png"), label)
    with pytest.raises(ValueError, match=r"000005\.png.*\[28, 40\]"):
        convert_seg(raw_copy / "images", raw_copy / "segs", tmp_path / "a", **QUIET)
    summary = convert_seg(raw_copy / "images", raw_copy / "segs", tmp_path / "b", num_classes=41, **QUIET)
    assert summary.samples == NUM


def test_malformed_json_and_missing_image(raw_copy, tmp_path):
    ann_file = raw_copy / "annotations" / "person_keypoints.json"
    good = ann_file.read_text()
    ann_file.write_text(good[:-10])
    with pytest.raises(ValueError, match="malformed JSON"):
        convert_coco(ann_file, raw_copy / "images", tmp_path / "a", **QUIET)
    ann_file.write_text(good)
    with pytest.raises(ValueError, match="face_kpts"):
        convert_coco(ann_file, raw_copy / "images", tmp_path / "b", "wholebody133", **QUIET)
    (raw_copy / "images" / "000001.jpg").write_bytes(b"not a jpeg")
    (raw_copy / "images" / "000006.jpg").unlink()
    with pytest.raises(ValueError, match="000001.jpg"):
        convert_coco(ann_file, raw_copy / "images", tmp_path / "c", **QUIET)
    summary = convert_coco(ann_file, raw_copy / "images", tmp_path / "d", skip_bad=True, **QUIET)
    assert (summary.samples, summary.skipped) == (NUM - 2, 2)


def test_cli_reports_errors_and_skip_count(raw_copy, tmp_path, capsys):
    (raw_copy / "normals" / "000002.npy").write_bytes(b"garbage")
    args = ["normal", "--images", str(raw_copy / "images"), "--arrays", str(raw_copy / "normals"),
            "--no-progress"]  # fmt: skip
    assert make_shards_main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "000002.npy" in capsys.readouterr().err
    assert make_shards_main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    assert "skipped 1 bad item(s)" in capsys.readouterr().out
    samples = read_tar_samples(tmp_path / "b")
    assert sorted(samples) == [f"{i:06d}" for i in range(1, NUM + 1) if i != 2]
    normal = np.load(io.BytesIO(samples["000001"]["normal.npy"]))
    assert np.array_equal(normal, np.load(raw_copy / "normals" / "000001.npy"))
