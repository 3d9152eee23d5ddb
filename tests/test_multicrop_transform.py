"""Multi-crop views for self-distillation: keys, sizes, and the device path matching the worker path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapiens.data.collate import collate_dicts
from sapiens.data.device_resize import is_packed, resize_crops
from sapiens.data.multicrop_transform import MultiCropTransform, view_keys, views_in_batch
from sapiens.data.shard_writer import open_shard_writer
from sapiens.data.shards import build_train_pipeline
from sapiens.lit.pretrain_distill import DistillPretrainModule
from tests.test_pipeline_speedups import _smooth_jpeg

GLOBAL, LOCAL = (64, 48), (32, 32)


def transform(resize_on: str = "worker", seed: int = 0, **kw) -> MultiCropTransform:
    kw = {"global_crops": 2, "local_crops": 3, "local_size": LOCAL, **kw}
    return MultiCropTransform(GLOBAL, resize_on=resize_on, seed=seed, **kw)


def test_views_have_their_keys_sizes_and_uint8_pixels():
    data, image = _smooth_jpeg(256, 192)
    out = transform()({"encoded": data, "image_hw": (256, 192), "key": "a"})
    global_keys, local_keys = view_keys(2, 3)
    assert (
        list(out)
        == [*global_keys, *local_keys]
        == ["image", "image_global1", "image_local0", "image_local1", "image_local2"]
    )
    assert views_in_batch(out) == (global_keys, local_keys)
    for key in global_keys:
        assert out[key].shape == (3, *GLOBAL) and out[key].dtype == torch.uint8
    for key in local_keys:
        assert out[key].shape == (3, *LOCAL) and out[key].dtype == torch.uint8
    assert not torch.equal(out["image"], out["image_global1"])  # two different crops of one image
    again = transform()({"encoded": data, "image_hw": (256, 192), "key": "a"})
    assert all(torch.equal(out[k], again[k]) for k in out)  # the same seed, the same views


def test_one_global_view_and_no_local_view_is_plain_pretraining_input():
    _, image = _smooth_jpeg(96, 72)
    out = transform(global_crops=1, local_crops=0)({"image": image})
    assert list(out) == ["image"] and out["image"].shape == (3, *GLOBAL)
    with pytest.raises(ValueError, match="global_crops"):
        MultiCropTransform(GLOBAL, global_crops=0)


def test_device_path_matches_the_worker_path():
    """Same seed, same crops and flips: the packed crops resized after the transfer equal the worker's
    cv2 resize up to the two bicubic kernels' rounding."""
    data, _ = _smooth_jpeg(256, 192, seed=3)
    samples = [{"encoded": data, "image_hw": (256, 192), "key": f"{i}"} for i in range(2)]
    worker_t, device_t = transform("worker", seed=7), transform("device", seed=7)
    worker = collate_dicts([worker_t(s) for s in samples])
    packed = collate_dicts([device_t(s) for s in samples])
    global_keys, local_keys = views_in_batch(packed)
    for key in global_keys + local_keys:
        assert is_packed(packed[key])
        out = resize_crops(packed[key])
        assert out.shape == worker[key].shape
        diff = (out.int() - worker[key].int()).abs().float()
        assert diff.mean() < 2.0, (key, diff.mean())


def test_views_through_the_shard_pipeline_and_the_module_hook(tmp_path):
    with open_shard_writer(tmp_path, "p", progress=False, verbose=False) as sink:
        for i in range(6):
            sink.write({"__key__": f"{i:03d}", "jpg": _smooth_jpeg(128, 96, seed=i)[0]})
    for resize_on in ("worker", "device"):
        loader = build_train_pipeline(
            sink.summary.paths, 3, epoch_length=2, sample_transform=transform(resize_on), num_workers=0
        )
        batch = next(iter(loader))
        module = DistillPretrainModule(
            {"embed_dim": 32, "depth": 1, "num_heads": 4, "patch_size": 16},
            image_size=GLOBAL,
            decoder={"dim": 16, "depth": 1, "heads": 2},
            heads={"prototypes": 8, "hidden_dim": 8, "bottleneck_dim": 4},
        )
        out = module.on_after_batch_transfer(batch, 0)
        for key in views_in_batch(out)[0] + views_in_batch(out)[1]:
            size = GLOBAL if key.startswith("image_global") or key == "image" else LOCAL
            assert out[key].shape == (3, 3, *size) and out[key].dtype == torch.float32, key
            assert np.isfinite(out[key].numpy()).all()
