"""The data-pipeline speed-ups: reused shared-memory batch buffers, DCT-scaled JPEG decoding of
large crops, and the random-resized-crop resize moved to the device."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from sapiens.data.batch_buffers import BufferPool, buffer_pool
from sapiens.data.collate import collate_dicts
from sapiens.data.device_resize import DeviceCrop, is_packed, pack_device_crops, resize_crops
from sapiens.data.pretrain_transform import PretrainTransform, dct_scale_for_crop
from sapiens.data.readers import CorruptSampleError, read_pretrain_encoded
from sapiens.data.shard_writer import open_shard_writer
from sapiens.data.shards import build_eval_pipeline, build_train_pipeline
from sapiens.lit.base import SapiensModule


# -- reused shared-memory buffers ---------------------------------------------------------------
class _NumberedBatches(IterableDataset):
    """Batch i is filled with the value i; each batch reports the worker pool's fresh allocations."""

    def __init__(self, count: int):
        self.count = count

    def __iter__(self):
        for i in range(self.count):
            pool = buffer_pool()
            samples = [{"x": torch.full((64, 64), i, dtype=torch.int32)} for _ in range(2)]
            batch = collate_dicts(samples, pool)
            batch["fresh"] = pool.fresh_allocations
            yield batch


def test_worker_reuses_buffers_once_the_main_process_frees_batches():
    fresh = []
    for batch in DataLoader(_NumberedBatches(12), batch_size=None, num_workers=1, prefetch_factor=2):
        assert torch.all(batch["x"] == len(fresh))
        fresh.append(batch["fresh"])
        del batch
    # prefetching keeps ~3 batches lent at a time; after that every batch reuses a freed buffer
    assert fresh[-1] <= 4 < len(fresh), fresh


def test_batches_kept_by_the_consumer_are_never_overwritten():
    kept = list(DataLoader(_NumberedBatches(12), batch_size=None, num_workers=1))
    views = [b["x"][0, :4] for b in kept]  # a view keeps its buffer lent too
    for i, (batch, view) in enumerate(zip(kept, views, strict=True)):
        assert torch.all(batch["x"] == i) and torch.all(view == i)
    assert kept[-1]["fresh"] == 12  # the pool (capacity 8) ran out and fell back to fresh memory


def test_shard_loader_flags_buffers_lent_and_released(tmp_path):
    """Through the real pipeline (flags made by the main process, named by token in each batch)."""
    with open_shard_writer(tmp_path, "p", progress=False, verbose=False) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:03d}", "jpg": _smooth_jpeg(64, 48, seed=i)[0]})
    loader = build_train_pipeline(
        sink.summary.paths, 2, epoch_length=12, sample_transform=PretrainTransform((32, 24)), num_workers=1
    )
    kept = list(loader)  # all 12 held: the 4 pooled buffers (prefetch 2 + 2) are lent, 8 got fresh memory
    flags = loader.stream.pool_flags.flags
    assert int(flags.sum()) == 4
    del kept
    assert int(flags.sum()) == 0  # freed in this process -> handed back to the worker
    for batch in loader:  # the next epoch reuses them (contents checked by the test above)
        assert batch["image"].shape == (2, 3, 32, 24) and batch["num_skipped"].dtype == torch.int64
    loader.close()


def test_pool_serves_a_smaller_request_from_a_free_larger_buffer():
    pool = BufferPool(capacity=2)
    a = pool.empty((100,), torch.uint8)
    slot = pool.pending[0][1]
    pool.flags[slot] = 0  # what the main process does when the batch is freed
    b = pool.empty((80,), torch.uint8)
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert pool.fresh_allocations == 1
    pool.flags[:] = 0
    pool.empty((30,), torch.uint8)  # less than half the free buffer: a new one
    assert pool.fresh_allocations == 2


# -- DCT-scaled decoding ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("crop", "out", "factor"),
    [
        ((1024, 768), (1024, 768), 1),
        ((2048, 1536), (1024, 768), 2),
        ((1500, 1536), (1024, 768), 1),  # 1500 < 2 x 1024
        ((4096, 3072), (512, 384), 8),
        ((31, 64), (4, 4), 4),  # 31 < 8 x 4
    ],
)
def test_dct_scale_keeps_the_crop_at_least_the_output_size(crop, out, factor):
    assert dct_scale_for_crop(crop, out) == factor


def _smooth_jpeg(h: int, w: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return simplejpeg.encode_jpeg(image, quality=95, colorspace="RGB"), image


@pytest.mark.parametrize(("source", "out"), [((512, 384), (64, 48)), ((512, 384), (128, 96))])
def test_down_scales_match_pillow_style_antialiasing(source, out):
    """Both down-scale paths (DCT-scaled decode; full decode + INTER_AREA) stay within a grey
    level or so of an antialiased bicubic resize of the full image, as the published recipe's
    Pillow RandomResizedCrop makes."""
    data, _ = _smooth_jpeg(*source)
    full = simplejpeg.decode_jpeg(data, colorspace="RGB")
    chw = torch.from_numpy(full).permute(2, 0, 1)[None].float()
    pillow = F.interpolate(chw, size=out, mode="bicubic", antialias=True)[0]
    sample = read_pretrain_encoded({"__key__": "k", "jpg": data})
    assert sample["image_hw"] == source
    kwargs = {"image_size": out, "scale": (1, 1), "ratio": (0.75, 0.75), "hflip_prob": 0}
    scaled = PretrainTransform(**kwargs)(sample)["image"]  # DCT-scaled decode
    area = PretrainTransform(**kwargs)({"image": full})["image"]  # INTER_AREA
    for got in (scaled, area):
        assert got.shape == (3, *out)
        assert (got.float() - pillow).abs().mean() < 1.5


@pytest.mark.parametrize("resize_on", ["worker", "device"])
def test_encoded_path_skips_and_names_a_truncated_jpeg(tmp_path, resize_on):
    data, _ = _smooth_jpeg(256, 192)
    with open_shard_writer(tmp_path, "t", progress=False, verbose=False) as sink:
        sink.write({"__key__": "good", "jpg": data})
        sink.write({"__key__": "cut", "jpg": data[: len(data) // 3]})
        sink.write({"__key__": "junk", "jpg": b"\xff\xd8\xffnot a jpeg"})
        sink.write({"__key__": "good2", "jpg": data})
    transform = PretrainTransform((32, 24), resize_on=resize_on)
    cut = read_pretrain_encoded({"__key__": "cut", "jpg": data[: len(data) // 3]})
    with pytest.raises(CorruptSampleError, match="'cut'"):
        collate_dicts([transform(cut)])  # device: the JPEG is decoded while collating
    batches = list(build_eval_pipeline(sink.summary.paths, 4, sample_transform=transform, num_workers=0))
    images = [SapiensModule().on_after_batch_transfer(b, 0)["image"] for b in batches]
    assert sum(len(i) for i in images) == 2 and all(i.shape[1:] == (3, 32, 24) for i in images)
    assert sum(int(b["num_skipped"]) for b in batches) == 2


# -- resize on the device -----------------------------------------------------------------------
def test_device_resize_matches_the_worker_resize():
    data, image = _smooth_jpeg(120, 96)
    decoded = simplejpeg.decode_jpeg(data, colorspace="RGB")
    boxes = [(10, 5, 100, 75), (0, 0, 60, 45), (0, 0, 96, 72)]  # up-scale, up-scale, exact size
    flips = [True, False, True]
    crops = [
        DeviceCrop((96, 72), box, flip, (120, 96), pixels=image)
        for box, flip in zip(boxes, flips, strict=True)
    ]
    crops.append(DeviceCrop((96, 72), boxes[0], True, (120, 96), encoded=data))  # decoded when packed
    packed, failed = pack_device_crops(crops)
    assert failed == [] and is_packed(packed)
    assert packed["packed"].numel() == (3 * 120 * 96 + 60 * 45) * 3  # the small crop 1 is cut down
    out = resize_crops(packed)
    assert out.shape == (4, 3, 96, 72) and out.dtype == torch.uint8
    exact = np.ascontiguousarray(image[:96, :72][:, ::-1]).transpose(2, 0, 1)
    np.testing.assert_array_equal(out[2].numpy(), exact)  # no resize: a pure crop and flip
    for i, source in [(0, image), (1, image), (3, decoded)]:
        top, left, h, w = boxes[i % 3]
        worker = cv2.resize(source[top : top + h, left : left + w], (72, 96), interpolation=cv2.INTER_CUBIC)
        worker = worker[:, ::-1] if crops[i].flip else worker
        diff = np.abs(out[i].numpy().transpose(1, 2, 0).astype(int) - worker.astype(int))
        assert diff.mean() < 1.5, diff.mean()  # two bicubic kernels, same picture


def test_small_crops_of_large_images_are_cut_down_before_the_transfer():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    small, large = (30, 20, 60, 50), (0, 0, 150, 120)  # 9% and 56% of the image
    crops = [DeviceCrop((48, 36), box, False, (200, 160), pixels=image) for box in (large, small, large)]
    packed, _ = pack_device_crops(crops)
    assert packed["shapes"] == [(200, 160), (60, 50), (200, 160)]
    assert packed["boxes"] == [large, (0, 0, 60, 50), large]
    assert packed["packed"].numel() == (2 * 200 * 160 + 60 * 50) * 3
    uncut = resize_crops({**packed, "packed": torch.from_numpy(np.concatenate([image.ravel()] * 3)),
                          "shapes": [(200, 160)] * 3, "boxes": [large, small, large]})  # fmt: skip
    torch.testing.assert_close(resize_crops(packed), uncut)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_resize_through_the_pipeline_and_the_module_hook(tmp_path, workers):
    with open_shard_writer(tmp_path, "p", progress=False, verbose=False) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:03d}", "jpg": _smooth_jpeg(128, 96, seed=i)[0]})
    transform = PretrainTransform((32, 24), resize_on="device")
    loader = build_train_pipeline(
        sink.summary.paths, 4, epoch_length=3, sample_transform=transform, num_workers=workers
    )
    batches = list(loader)
    assert len(batches) == 3 and all(is_packed(b["image"]) for b in batches)
    assert all(len(b["image"]["boxes"]) == 4 for b in batches)
    out = SapiensModule().on_after_batch_transfer(batches[0], 0)
    assert out["image"].shape == (4, 3, 32, 24) and out["image"].dtype == torch.float32
    assert out["image"].is_contiguous() and torch.isfinite(out["image"]).all()
    with pytest.raises(ValueError, match="resize_on"):
        PretrainTransform((32, 24), resize_on="gpu")
