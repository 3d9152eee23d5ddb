"""``predict``: the Predictor equals validation's forward and decoding, boxes, flip test, video, outputs,
COCO results, published files, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.synthhumans import render_sample
from sapiens.codecs.udp_heatmap import flip_heatmaps
from sapiens.data.dense_transform import DenseTransform
from sapiens.data.pose_transform import TopDownPoseTransform
from sapiens.labels import load_keypoint_set
from sapiens.predict import Predictor
from sapiens.predict.boxes import boxes_from_foreground, boxes_from_keypoints
from sapiens.predict.outputs import OutputWriter, next_run_dir
from sapiens.predict.pipeline import run_predict
from sapiens.predict.results import PoseResult, Prediction
from sapiens.predict.sources import Frame, resolve_source
from sapiens.predict.tracking import OneEuroFilter
from tests.checkpoint_factory import SIZE, TASKS, make_module, save_ours, save_published

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """task -> (module, our checkpoint, published checkpoint)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for task in TASKS:
        module = make_module(task, seed=TASKS.index(task))
        out[task] = (
            module,
            save_ours(module, folder / f"{task}.ckpt"),
            save_published(module, folder / f"{task}.pth"),
        )
    return out


def synth_image(seed: int = 0) -> dict:
    return render_sample(seed, height=128, width=96, max_people=1)


# ---------------------------------------------------------------------- equality with validation
@pytest.mark.parametrize("task", ["seg", "depth", "normal"])
def test_dense_predict_equals_validation_forward(task, models):
    """Validation's transform + the module's own forward and decoding, at the source resolution."""
    module, ckpt, _ = models[task]
    sample = synth_image()
    image = sample["image"]
    label = {"seg": sample["seg"], "depth": sample["depth"], "normal": sample["normal"]}[task]
    item = DenseTransform(task, SIZE, train=False)({"image": image, task: label, "mask": sample["mask"]})
    batch = module.on_after_batch_transfer({"image": item["image"][None]}, 0)
    with torch.no_grad():
        expected = module.task.decode(module.task.predict(module, batch), image.shape[:2])[0].numpy()
    got = Predictor(ckpt, device="cpu").predict([image])[0]
    if task == "seg":
        assert np.array_equal(got.seg.labels, expected) and len(np.unique(expected)) > 1
    elif task == "depth":
        np.testing.assert_allclose(got.depth.depth, expected, atol=1e-5)
    else:
        np.testing.assert_allclose(got.normal.normals, expected, atol=1e-5)
        assert np.allclose(np.linalg.norm(got.normal.normals, axis=0), 1, atol=1e-4)
    assert got.height == 128 and got.width == 96


def test_pose_predict_equals_validation_forward(models):
    """Same box -> same 1.25-padded 3:4 UDP crop, flip test and DARK-UDP decoding as validation."""
    module, ckpt, _ = models["pose"]
    image = synth_image(1)["image"]
    box = np.array([10.0, 12.0, 50.0, 90.0], np.float32)
    person = {"id": 0, "bbox": box, "area": 4500.0, "iscrowd": 0, "keypoints": np.ones((17, 3), np.float32)}
    transform = TopDownPoseTransform("coco17", input_size=SIZE, sigma=1.5, train=False)
    items = transform(
        {"image": image, "key": "k", "image_id": 1, "width": 96, "height": 128, "persons": [person]}
    )
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "center", "scale")}
    batch = module.on_after_batch_transfer(batch, 0)
    with torch.no_grad():
        expected = module.task.decode(module.task.predict(module, batch), batch)
    got = Predictor(ckpt, device="cpu")(image, boxes=box[None])
    assert got.pose.box_source == "given" and got.pose.num_persons == 1
    np.testing.assert_allclose(got.pose.keypoints[0], expected[0, :, :2], atol=1e-3)
    np.testing.assert_allclose(got.pose.keypoint_scores[0], expected[0, :, 2], atol=1e-5)


# ---------------------------------------------------------------------- pose details
def test_flip_test_maps_back_and_swaps_left_right(models):
    """With the flip test, a mirrored crop gives the mirrored heatmaps with left and right swapped
    (exactly: the average is symmetric); without it, it does not."""
    module = models["pose"][0]
    kset = load_keypoint_set("coco17")
    x = module.on_after_batch_transfer(
        {"image": torch.from_numpy(synth_image(2)["image"][:64, :48].copy()).permute(2, 0, 1)[None]}, 0
    )["image"]
    with torch.no_grad():
        plain = module.task.predict(module, {"image": x})
        mirrored = module.task.predict(module, {"image": x.flip(-1)})
        torch.testing.assert_close(mirrored, flip_heatmaps(plain, kset.flip_index), rtol=0, atol=1e-6)
        module.task.flip_test = False
        try:
            no_flip = module.task.predict(module, {"image": x.flip(-1)})
            raw = module.task.predict(module, {"image": x})
        finally:
            module.task.flip_test = True
    assert (no_flip - flip_heatmaps(raw, kset.flip_index)).abs().max() > 1e-3
    # Decoded: the left wrist of the mirrored crop is the mirrored right wrist (x -> W - 1 - x).
    xy, _ = module.task.codec.decode(plain)
    xy_m, _ = module.task.codec.decode(mirrored)
    left, right = kset.index("left_wrist"), kset.index("right_wrist")
    np.testing.assert_allclose(xy_m[0, left], [SIZE[1] - 1 - xy[0, right, 0], xy[0, right, 1]], atol=1e-3)


def test_boxes_from_a_seg_foreground():
    mask = np.zeros((100, 80), bool)
    mask[10:60, 5:25] = True  # person 1: 50 x 20
    mask[30:90, 40:70] = True  # person 2: 60 x 30 (largest)
    mask[95:96, 0:2] = True  # a 2-pixel speck
    boxes = boxes_from_foreground(mask)
    np.testing.assert_array_equal(boxes, [[40, 30, 30, 60], [5, 10, 20, 50]])
    assert boxes_from_foreground(np.zeros((10, 10), bool)).shape == (0, 4)
    kpts = np.array([[[10, 10], [30, 50], [99, 99]]], np.float32)
    boxes, index = boxes_from_keypoints(kpts, np.array([[0.9, 0.8, 0.1]]), thr=0.3)
    np.testing.assert_allclose(boxes, [[7.5, 5.0, 25.0, 50.0]])  # extent 20 x 40 widened by 1.25
    assert index.tolist() == [0]


def test_seg_and_pose_in_one_pass_share_the_image_and_the_foreground(models):
    predictor = Predictor([models["pose"][1], models["seg"][1], models["depth"][1]], device="cpu")
    assert predictor.tasks == ["seg", "depth", "pose"]  # dense first: seg gives pose its boxes
    image = synth_image(3)["image"]
    pred = predictor(image)
    expected = boxes_from_foreground(pred.seg.foreground)
    assert pred.pose.box_source == "seg" and pred.pose.num_persons == len(expected) > 0
    np.testing.assert_array_equal(pred.pose.boxes, expected)
    assert np.array_equal(pred.depth.mask, pred.seg.foreground)
    picture = predictor.render(image, pred)
    assert picture.shape == (128, 4 * 96 + 3 * 4, 3)  # image | seg | depth | pose


def test_empty_foreground_gives_empty_outputs(models, tmp_path):
    """A seg model that sees only background: no persons, all-NaN depth, zero normals, no crash."""
    module = make_module("seg")
    with torch.no_grad():
        module.task.head.conv_seg.bias[0] = 1e4  # background wins everywhere
    seg = save_ours(module, tmp_path / "background.ckpt")
    source = tmp_path / "in" / "a.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), synth_image(4)["image"])
    cfg = {
        "source": str(source),
        "checkpoint": [str(seg), str(models["pose"][1]), str(models["depth"][1]), str(models["normal"][1])],
        "output_dir": str(tmp_path / "out"),
        "progress": False,
    }
    meta = run_predict(cfg)
    assert meta["images_written"] == 1
    out = tmp_path / "out"
    assert json.loads((out / "pose" / "a.json").read_text())["instances"] == []
    assert np.isnan(np.load(out / "depth" / "a.npy")).all()
    normals = np.load(out / "normal" / "a.npz")
    assert not normals["mask"].any() and not normals["normal"].any()
    assert (cv2.imread(str(out / "seg" / "a.png"), cv2.IMREAD_UNCHANGED) == 0).all()
    assert json.loads((out / "pose_results_coco.json").read_text()) == []


def test_boxes_from_a_detections_file_by_image_id(models, tmp_path):
    """COCO detections (the validation protocol's boxes): listed images use theirs above the score
    threshold; an image the file does not list falls back to the next source (here the full image)."""
    src = tmp_path / "coco"
    src.mkdir()
    for image_id in (139, 285, 632):
        cv2.imwrite(str(src / f"{image_id:012d}.jpg"), synth_image(image_id)["image"])
    dets = [
        {"image_id": 632, "category_id": 1, "bbox": [10, 12, 40, 80], "score": 0.2},  # listed, none kept
        {"image_id": 139, "category_id": 1, "bbox": [10, 12, 40, 80], "score": 0.9},
        {"image_id": 139, "category_id": 1, "bbox": [50, 20, 30, 60], "score": 0.8},
        {"image_id": 139, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1},  # below box_score_thr
        {"image_id": 139, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.99},  # not a person
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "out"
    run_predict(
        {
            "source": str(src),
            "checkpoint": str(models["pose"][1]),
            "boxes": str(tmp_path / "dets.json"),
            "output_dir": str(out),
            "progress": False,
        }
    )
    listed = json.loads((out / "pose" / "000000000139.json").read_text())
    assert listed["image_id"] == 139 and listed["box_source"] == "file"
    assert [p["bbox"] for p in listed["instances"]] == [[10, 12, 40, 80], [50, 20, 30, 60]]
    assert [p["bbox_score"] for p in listed["instances"]] == [0.9, 0.8]
    assert json.loads((out / "pose" / "000000000632.json").read_text())["instances"] == []
    unlisted = json.loads((out / "pose" / "000000000285.json").read_text())
    assert unlisted["box_source"] == "full" and unlisted["instances"][0]["bbox"] == [0, 0, 96, 128]
    results = json.loads((out / "pose_results_coco.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [139, 285]


def test_video_depth_colours_keep_the_first_frames_range():
    from sapiens.predict.pipeline import _Stream
    from sapiens.predict.results import DepthResult

    def frame(lo: float, hi: float) -> Prediction:
        depth = np.linspace(lo, hi, 100, dtype=np.float32).reshape(10, 10)
        return Prediction(10, 10, depth=DepthResult(depth, np.ones((10, 10), bool)))

    video = _Stream("clip", {"depth_range": "auto"})
    first = video.depth_range(frame(0.0, 1.0))
    assert first[0] < 0.02 and first[1] > 0.98
    assert video.depth_range(frame(5.0, 9.0)) == first  # later frames: the same colours for the same depth
    assert _Stream(None, {"depth_range": "auto"}).depth_range(frame(5.0, 9.0)) is None  # stills: per image
    assert _Stream("clip", {"depth_range": [1, 2]}).depth_range(frame(0.0, 1.0)) == (1.0, 2.0)


def test_bf16_autocast_runs_and_stays_close(models):
    image = synth_image(6)["image"]
    exact = Predictor(models["normal"][1], device="cpu")(image).normal.normals
    half = Predictor(models["normal"][1], device="cpu", precision="bf16")(image).normal.normals
    assert half.dtype == np.float32 and np.median(np.abs(half - exact)) < 0.05


# ---------------------------------------------------------------------- sources, outputs, video
def test_folder_glob_and_txt_sources(tmp_path):
    for rel in ("a.jpg", "sub/b.png", "sub/deeper/c.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), synth_image(0)["image"])
    names = [e.name for e in resolve_source(str(tmp_path))]
    assert names == ["a", "sub/b", "sub/deeper/c"]
    assert [e.name for e in resolve_source(str(tmp_path / "**" / "*.jpg"))] == ["a", "sub/deeper/c"]
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them\nsub/b.png\na.jpg\n")
    assert [e.name for e in resolve_source(str(listing))] == ["sub/b", "a"]
    numeric = tmp_path / "coco"
    numeric.mkdir()
    cv2.imwrite(str(numeric / "000000000139.jpg"), synth_image(0)["image"])
    assert resolve_source(str(numeric))[0].image_id == 139  # COCO names are the image ids
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_source(str(tmp_path / "nowhere"))
    assert next_run_dir(tmp_path / "runs").name == "1"


def write_video(path: Path, frames: int, fps: float, size=(96, 128)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(cv2.cvtColor(synth_image(i)["image"], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> tuple[int, float]:
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return count, fps


@pytest.mark.parametrize("codec,stride", [("auto", 1), ("mp4v", 2)])
def test_video_in_video_out_same_frames_and_rate(codec, stride, models, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=7, fps=10)
    out = tmp_path / "out"
    cfg = {
        "source": str(video),
        "checkpoint": [str(models["pose"][1]), str(models["depth"][1])],
        "output_dir": str(out),
        "progress": False,
        "vid_stride": stride,
        "video_codec": codec,
        "smoothing": True,
        "smoothing_params": {"min_cutoff": 1.0, "beta": 0.1, "d_cutoff": 1.0},
    }
    meta = run_predict(cfg)
    expected = len(range(0, 7, stride))
    count, fps = read_video(out / "vis" / "clip.mp4")
    assert (count, fps) == (expected, pytest.approx(10 / stride))
    assert meta["videos"]["clip"]["codec"] == ("libx264" if codec == "auto" else "mp4v")
    record = json.loads((out / "pose" / "clip.json").read_text())
    assert [f["frame_index"] for f in record["frames"]] == list(range(0, 7, stride))
    assert all("track_id" in p for f in record["frames"] for p in f["instances"])
    assert len(list((out / "depth" / "clip").glob("*.npy"))) == expected


def test_one_euro_filter_smooths_jitter_and_follows_motion():
    times = np.arange(60) / 30.0
    noise = np.random.default_rng(0).normal(0, 1.0, (60, 17, 2))
    still = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    smoothed = np.stack([still(p, t) for p, t in zip(noise, times, strict=True)])
    # A still person: alpha = 0.17 (1 Hz at 30 fps) leaves sqrt(a / (2 - a)) = 0.31 of the noise.
    assert np.abs(smoothed[10:]).mean() < 0.4 * np.abs(noise[10:]).mean()

    moving = 100 * times[:, None, None] * np.ones((1, 17, 2))  # 100 px/s, no noise

    def lag(beta: float) -> float:
        f = OneEuroFilter(min_cutoff=1.0, beta=beta)
        out = np.stack([f(p, t) for p, t in zip(moving, times, strict=True)])
        return float(np.abs(out - moving)[30:].mean())

    assert lag(0.5) < 0.1 * lag(0.0)  # the speed term removes most of the lag


def test_coco_results_json_is_scored_by_cocoeval(tmp_path):
    """Persons written through the output writer with ground-truth keypoints score AP 1 in COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    kset = load_keypoint_set("coco17")

    class OnlyPose:  # the writer only needs the pose task's label space here
        runners = {"pose": type("R", (), {"task": type("T", (), {"kset": kset})()})()}

    writer = OutputWriter(tmp_path, OnlyPose(), save_overlays=False, save_raw=False)
    images, annotations = [], []
    for image_id in (139, 285):
        sample = synth_image(image_id)
        persons = sample["persons"]
        kpts = np.stack([np.asarray(p["keypoints"], np.float32) for p in persons])
        boxes = np.asarray([p["bbox"] for p in persons], np.float32)
        result = PoseResult(
            boxes,
            np.ones(len(persons), np.float32),
            kpts[..., :2],
            (kpts[..., 2] > 0).astype(np.float32),
            "given",
        )
        writer.write(Frame(f"{image_id:012d}", sample["image"], image_id), Prediction(128, 96, pose=result))
        images.append({"id": image_id, "width": 96, "height": 128})
        for p in persons:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": p["bbox"],
                    "area": float(p["area"]),
                    "iscrowd": 0,
                    "num_keypoints": int((p["keypoints"][:, 2] > 0).sum()),
                    "keypoints": np.asarray(p["keypoints"]).reshape(-1).tolist(),
                }
            )
    writer.close({})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    gt.createIndex()
    results = json.loads((tmp_path / "pose_results_coco.json").read_text())
    assert {r["image_id"] for r in results} == {139, 285} and all(len(r["bbox"]) == 4 for r in results)
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "pose_results_coco.json")), iouType="keypoints")
    evaluator.params.kpt_oks_sigmas = kset.sigmas.astype(np.float64)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_shard_source_keeps_pose_image_ids(synth_root, models, tmp_path):
    out = tmp_path / "out"
    meta = run_predict(
        {
            "source": str(synth_root / "shards" / "pose" / "val"),
            "checkpoint": str(models["pose"][1]),
            "output_dir": str(out),
            "progress": False,
            "save_overlays": False,
        }
    )
    ids = {json.loads(p.read_text())["image_id"] for p in (out / "pose").glob("*.json")}
    from sapiens.tasks.pose import read_pose_ground_truth

    assert ids == {r["image_id"] for r in read_pose_ground_truth(str(synth_root / "shards" / "pose" / "val"))}
    assert meta["images_written"] == len(ids) == 12


# ---------------------------------------------------------------------- published files and the API
@pytest.mark.parametrize("task", TASKS)
def test_published_checkpoints_predict_like_ours(task, models):
    _, ours, published = models[task]
    image = synth_image(5)["image"]
    a = Predictor(ours, device="cpu")(image)[task]
    b = Predictor(published, task=task, device="cpu")(image)[task]
    for field in a.__dataclass_fields__:
        left, right = getattr(a, field), getattr(b, field)
        if isinstance(left, np.ndarray):
            np.testing.assert_array_equal(left, right)


def test_predictor_api_batches_of_any_size_and_typed_results(models):
    predictor = Predictor([models["seg"][1], models["normal"][1]], device="cpu", batch_size=2)
    images = [synth_image(i)["image"] for i in range(3)] + [cv2.resize(synth_image(9)["image"], (60, 70))]
    preds = predictor.predict(images)
    assert [(p.height, p.width) for p in preds] == [(128, 96)] * 3 + [(70, 60)]
    assert preds[3].seg.labels.shape == (70, 60) and preds[3].seg.labels.dtype == np.uint8
    assert preds[3].normal.normals.shape == (3, 70, 60) and preds[3].pose is None
    with pytest.raises(ValueError, match="uint8 RGB"):
        predictor.predict([np.zeros((10, 10))])


# ---------------------------------------------------------------------- bad input
def test_unreadable_images_and_frames_are_skipped_and_counted(models, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "good.png"), synth_image(0)["image"])
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    good = (src / "good.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 3])
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    meta = run_predict(
        {
            "source": str(src),
            "checkpoint": str(models["seg"][1]),
            "output_dir": str(tmp_path / "o"),
            "progress": False,
        }
    )
    assert meta["images_written"] == 1 and meta["skipped"] == 3
    on_disk = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert on_disk["skipped"] == 3 and any("corrupt.jpg" in s for s in on_disk["skipped_inputs"])
    with pytest.raises(ValueError, match="not one image could be read"):
        run_predict(
            {
                "source": str(src / "corrupt.jpg"),
                "checkpoint": str(models["seg"][1]),
                "output_dir": str(tmp_path / "o2"),
                "progress": False,
            }
        )


def test_missing_codec_is_a_one_line_error(models, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=2, fps=5)
    with pytest.raises(ValueError) as err:
        run_predict(
            {
                "source": str(video),
                "checkpoint": str(models["seg"][1]),
                "output_dir": str(tmp_path / "o"),
                "progress": False,
                "video_codec": "libnotacodec",
            }
        )
    assert "clip.mp4" in str(err.value) and "libnotacodec" in str(err.value) and "\n" not in str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sapiens.predict", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_runs_and_bad_files_are_one_line_errors(models, tmp_path):
    image = tmp_path / "person.png"
    cv2.imwrite(str(image), synth_image(0)["image"])
    ok = run_cli(
        f"source={image}",
        f"checkpoint=[{models['seg'][1]},{models['pose'][2]}]",
        f"output_dir={tmp_path / 'out'}",
        "progress=false",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "out" / "vis" / "person.jpg").exists() and (tmp_path / "out" / "meta.json").exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for args, needle in [
        ([f"checkpoint={garbage}"], str(garbage)),
        ([f"checkpoint={tmp_path / 'absent.pth'}"], "absent.pth"),
        ([f"checkpoint={models['seg'][1]}", "task=keypoints"], "keypoints"),
        ([f"checkpoint={models['seg'][2]}", "task=pose"], "holds a seg model"),
    ]:
        bad = run_cli(f"source={image}", *args, f"output_dir={tmp_path / 'bad'}")
        lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
