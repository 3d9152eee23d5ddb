"""Pointmap task: exact targets from SynthHumans, intrinsics through augmentation, filters, loss, metrics,
the pointmap shard converter and reader."""

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from data.converters.pointmap import convert_pointmap
from data.synthhumans.scene import render_sample
from data.synthhumans.writer import generate_dataset
from sapiens.data.dense_transform import DenseTransform
from sapiens.data.readers import CorruptSampleError, read_pointmap
from sapiens.losses_sapiens2 import normals_from_points, points_from_depth
from sapiens.metrics.pointmap import PointmapMetrics, sobel_normals
from sapiens.models.heads_sapiens2 import PointmapHead, PointmapOutput
from sapiens.models.sapiens2 import Sapiens2
from sapiens.tasks.pointmap import PointmapTask
from tests.conftest import ROOT
from tests.test_converters_labels import read_tar_samples


def intrinsics_matrix(cam: dict) -> np.ndarray:
    return np.array([[cam["fx"], 0, cam["cx"]], [0, cam["fy"], cam["cy"]], [0, 0, 1]], np.float64)


@pytest.fixture(scope="module")
def sample():
    return render_sample(3, height=96, width=64, max_people=2)


def test_synthhumans_targets_reproject_to_depth_exactly(sample):
    """XYZ from depth + the written intrinsics equals the renderer's exact hit points, and projecting those
    points with K lands on the pixel centres with Z = depth."""
    depth = torch.from_numpy(sample["depth"])[None]
    k = torch.from_numpy(intrinsics_matrix(sample["intrinsics"]))[None]
    points = points_from_depth(depth, k)[0].permute(1, 2, 0).numpy()
    exact = sample["pointmap"]
    fg = sample["mask"] > 0
    assert fg.sum() > 100
    assert np.allclose(points[fg], exact[fg], rtol=1e-5, atol=1e-6)
    assert np.array_equal(exact[fg][:, 2], sample["depth"][fg])  # Z is the depth, bit for bit
    cam = sample["intrinsics"]
    rows, cols = np.nonzero(fg)
    u = cam["fx"] * exact[fg][:, 0].astype(np.float64) / exact[fg][:, 2] + cam["cx"]
    v = cam["fy"] * exact[fg][:, 1].astype(np.float64) / exact[fg][:, 2] + cam["cy"]
    assert np.abs(u - cols).max() < 1e-3 and np.abs(v - rows).max() < 1e-3
    assert np.all(exact[~fg] == 0)


def _decoded(sample) -> dict:
    return {
        "key": "s",
        "image": sample["image"],
        "depth": sample["depth"],
        "mask": sample["mask"] > 0,
        "intrinsics": intrinsics_matrix(sample["intrinsics"]),
    }


@pytest.mark.parametrize("flip", [False, True])
def test_zoom_crop_and_flip_keep_intrinsics_consistent(sample, flip):
    """After augmentation, XYZ from the warped depth and the transformed K is the true 3D point of the source
    pixel each output pixel sampled (nearest), mirrored in X after a flip."""
    t = DenseTransform("pointmap", (96, 64), train=True, scale_range=(1.6, 1.6), rotate=0.0,
                       flip_prob=1.0 if flip else 0.0, photometric=False)  # fmt: skip
    out = t(_decoded(sample), np.random.default_rng(0))
    k_new = out["intrinsics"].double()
    k_old = torch.from_numpy(intrinsics_matrix(sample["intrinsics"]))
    points = points_from_depth(out["depth"][None], k_new[None])[0].permute(1, 2, 0).double()
    valid = out["mask"] & (out["depth"] > 0)
    assert valid.sum() > 50
    a = (k_new[0, 0] / k_old[0, 0]).item()
    b_x, b_y = (k_new[0, 2] - a * k_old[0, 2]).item(), (k_new[1, 2] - a * k_old[1, 2]).item()
    rows, cols = torch.nonzero(valid, as_tuple=True)
    u_out = (63 - cols) if flip else cols  # pixel of the un-flipped warp
    if flip:  # K's cx was mirrored: recover the warp offset of the un-flipped image
        b_x = (63 - k_new[0, 2] - a * k_old[0, 2]).item()
    src_u = torch.round((u_out.double() - b_x) / a).long()
    src_v = torch.round((rows.double() - b_y) / a).long()
    truth = torch.from_numpy(sample["pointmap"]).double()[src_v, src_u]
    if flip:
        truth[:, 0] = -truth[:, 0]
    got = points[rows, cols]
    assert torch.allclose(got[:, 2], truth[:, 2])  # depth values move unchanged
    spacing = truth[:, 2] / k_old[0, 0]  # one source pixel at that depth
    assert ((got[:, :2] - truth[:, :2]).abs().max(dim=1).values <= 0.5 * spacing * 1.01 + 1e-6).all()


def test_rotation_is_refused_for_pointmaps():
    with pytest.raises(ValueError, match="rotate must be 0"):
        DenseTransform("pointmap", (96, 64), train=True, rotate=30.0)


def test_published_sample_filters(sample):
    t = DenseTransform("pointmap", (96, 64), train=False)
    assert t(_decoded(sample)) is not None
    few = dict(_decoded(sample), mask=np.zeros((96, 64), bool))
    few["mask"][:3, :5] = True
    assert t(few) is None  # 15 valid pixels < 16
    full = dict(_decoded(sample), depth=np.full((96, 64), 3.0, np.float32), mask=np.ones((96, 64), bool))
    assert t(full) is None  # 100 % valid > 96 %
    near = _decoded(sample)
    near["depth"] = np.where(near["mask"], near["depth"], 0).astype(np.float32)
    near["depth"][near["mask"]] = 0.03
    assert t(near) is None  # nearest valid depth 0.03 m < 0.04 m


def tiny_task(image_size=(64, 48), focal=48.0) -> tuple[Sapiens2, PointmapTask]:
    torch.manual_seed(0)
    backbone = Sapiens2(img_size=image_size, embed_dim=32, depth=2, num_heads=2, num_register_tokens=2)

    head = partial(PointmapHead, upsample_channels=(16, 16, 8, 8), conv_channels=(8, 8, 8))
    head = partial(head, scale_channels=(16, 8, 8), scale_strides=(2, 1, 1))

    return backbone, PointmapTask(32, image_size, head=head, canonical_focal=focal)


def synthetic_batch(n=2, size=(64, 48)) -> dict:
    batch = {"image": [], "depth": [], "mask": [], "intrinsics": []}
    for seed in range(n):
        s = render_sample(seed, height=size[0], width=size[1], max_people=1)
        batch["image"].append(torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 64 - 2)
        batch["depth"].append(torch.from_numpy(s["depth"]))
        batch["mask"].append(torch.from_numpy(s["mask"] > 0))
        batch["intrinsics"].append(torch.from_numpy(intrinsics_matrix(s["intrinsics"])).float())
    return {k: torch.stack(v) for k, v in batch.items()}


def test_pointmap_loss_falls_on_a_fixed_batch():
    backbone, task = tiny_task()
    batch = synthetic_batch()
    params = list(backbone.parameters()) + list(task.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(25):
        loss = task.loss(task(backbone(batch["image"])), batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 4.0)
        opt.step()
        losses.append(loss.item())
    assert set(task.loss_terms) == {
        "l1",
        "multiscale",
        "shift_l1",
        "silog",
        "k_consistency",
        "normal",
        "scale",
    }
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_loss_is_zero_for_the_exact_answer_and_scale_is_canonical():
    _, task = tiny_task()
    batch = synthetic_batch()
    target, scale, valid = task.targets(batch)
    assert torch.allclose(scale, 48.0 / batch["intrinsics"][:, 0, 0])
    terms = task.loss_fn(target, scale[:, None], target, scale, valid, batch["intrinsics"])
    assert all(float(v) < 1e-5 for v in terms.values())
    shifted = task.loss_fn(target + 0.1, scale[:, None] * 2, target, scale, valid, batch["intrinsics"])
    assert shifted["l1"] > 0 and shifted["scale"] > 0 and shifted["shift_l1"] < 1e-5


def test_metrics_hand_computed_and_perfect():
    target = torch.zeros(1, 3, 8, 8)
    target[:, 2] = 2.0
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    m = PointmapMetrics()
    m.update(target + torch.tensor([0.07, 0.0, 0.0]).view(1, 3, 1, 1), target, valid,
             torch.tensor([[1.1]]), torch.tensor([1.0]))  # fmt: skip
    r = m.compute()
    assert r["l2"].item() == pytest.approx(0.07) and r["mae_x"].item() == pytest.approx(0.07)
    assert r["mae_z"].item() == 0 and r["rmse"].item() == pytest.approx(0.07)
    assert r["within_5cm"].item() == 0 and r["within_10cm"].item() == 100
    assert r["scale_abs_rel"].item() == pytest.approx(0.1)
    backbone, task = tiny_task()
    batch = synthetic_batch()
    target, scale, _ = task.targets(batch)
    task.update_metrics(PointmapOutput(target, scale[:, None]), batch)
    perfect = task.compute_metrics()
    assert perfect["l2"] < 1e-6 and perfect["within_5cm"] == 100 and perfect["depth_rmse"] < 1e-4
    assert perfect["normal_mean_angular_error"] < 0.1 and perfect["depth_delta1"] == 1.0
    picture = task.render(batch, PointmapOutput(target, scale[:, None]), 2)
    assert picture.ndim == 3 and picture.dtype == np.uint8


def test_normals_of_a_plane():
    v, u = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    z = 5.0 + 0.1 * u  # a plane tilted about the y axis
    points = torch.stack([(u - 5) * z / 10, (v - 6) * z / 10, z])[None]
    expected = torch.nn.functional.normalize(torch.tensor([0.1 * 10 / 5.0, 0.0, -1.0]), dim=0)
    n = normals_from_points(points)[0].permute(1, 2, 0).reshape(-1, 3)
    sobel, ok = sobel_normals(points, torch.ones(1, 12, 10, dtype=torch.bool))
    assert ok[0, 2:-2, 2:-2].all() and not ok[0, 0].any()
    for normals in (n, sobel[0].permute(1, 2, 0)[ok[0]]):
        cos = normals @ expected
        assert torch.allclose(cos.abs(), torch.ones_like(cos), atol=2e-3)


@pytest.fixture(scope="module")
def raw_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("pm_raw")
    generate_dataset(root, 4, seed=1, height=64, width=48, progress=False)
    return root


def test_converter_and_reader_round_trip(raw_split, tmp_path):
    convert_pointmap(raw_split / "images", raw_split / "depths", raw_split / "intrinsics", tmp_path / "pm",
                     raw_split / "masks", progress=False)  # fmt: skip
    samples = list(read_tar_samples(tmp_path / "pm").values())
    assert len(samples) == 4
    decoded = read_pointmap(samples[0])
    stem = samples[0]["__key__"]
    cam = json.loads((raw_split / "intrinsics" / f"{stem}.json").read_text())
    assert np.allclose(decoded["intrinsics"], intrinsics_matrix(cam))
    assert np.array_equal(decoded["depth"], np.load(raw_split / "depths" / f"{stem}.npy"))
    broken = dict(samples[0], **{"intrinsics.json": b'{"fx": 0, "fy": 1, "cx": 1, "cy": 1}'})
    with pytest.raises(CorruptSampleError, match="intrinsics.json.*fx, fy > 0"):
        read_pointmap(broken)
    missing = {k: v for k, v in samples[0].items() if k != "intrinsics.json"}
    with pytest.raises(CorruptSampleError, match="missing entry 'intrinsics.json'"):
        read_pointmap(missing)


def test_make_shards_pointmap_cli_bad_input(raw_split, tmp_path):
    bad = tmp_path / "cams"
    bad.mkdir()
    for path in sorted((raw_split / "intrinsics").glob("*.json"))[1:]:
        (bad / path.name).write_text(path.read_text())
    (bad / "000001.json").write_text('{"fx": "wide"}')
    args = [sys.executable, "-m", "data.make_shards", "pointmap", "--images", str(raw_split / "images"),
            "--depths", str(raw_split / "depths"), "--intrinsics", str(bad)]  # fmt: skip
    proc = subprocess.run([*args, "--out", str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "000001.json: bad intrinsics" in proc.stderr and "--skip-bad" in proc.stderr
    proc = subprocess.run([*args, "--out", str(tmp_path / "b"), "--skip-bad"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0 and "skipped 1 bad item" in proc.stdout
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"K": [[50, 0, 23.5], [0, 50, 31.5], [0, 0, 1]]}))
    proc = subprocess.run([*args[:-1], str(one), "--out", str(tmp_path / "c")], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sample = next(iter(read_tar_samples(tmp_path / "c").values()))
    assert json.loads(sample["intrinsics.json"]) == {"fx": 50.0, "fy": 50.0, "cx": 23.5, "cy": 31.5}


def test_trivial_baselines_script(synth_root, capsys):
    """experiments.pointmap_baselines: the camera-aware ray baseline beats the constant point."""
    from experiments.pointmap_baselines import main

    assert main(["--root", str(synth_root), "--size", "64", "48", "--focal", "48"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    value = {
        name: dict(zip(cells[1::2], map(float, cells[2::2]), strict=True)) for name, cells in lines.items()
    }
    assert 0 < value["rays"]["l2"] < value["constant"]["l2"]
    assert value["rays"]["normal_mean_angular_error"] < 60
