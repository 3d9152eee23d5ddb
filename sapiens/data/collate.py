"""Collate a list of sample dicts into a batch dict (used inside DataLoader workers)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sapiens.data.batch_buffers import BufferPool
from sapiens.data.device_resize import DeviceCrop, pack_device_crops
from sapiens.data.readers import CorruptSampleError


def _stackable(values: list[Any]) -> bool:
    first = values[0]
    return all(v.shape == first.shape and v.dtype == first.dtype for v in values)


def _batch_tensor(values: list[torch.Tensor], pool: BufferPool | None) -> torch.Tensor:
    """Stack into one new (B, ...) tensor, copying each sample once.

    Channel-first views of channel-last images (what ``image_to_tensor`` returns) are stacked into
    channel-last memory and returned as a (B, C, H, W) view of it: a plain copy per sample, where
    writing a contiguous (B, C, H, W) block would transpose every pixel (3x slower at 1024x768).
    With a ``pool`` (inside DataLoader workers) the batch goes into a reusable shared-memory
    buffer, which saves the extra copy the hand-over to the main process would otherwise make.
    """
    first = values[0]
    channels_last = first.ndim == 3 and not first.is_contiguous() and first.permute(1, 2, 0).is_contiguous()
    if channels_last:
        values = [v.permute(1, 2, 0) for v in values]
    shape = (len(values), *values[0].shape)
    out = pool.empty(shape, first.dtype) if pool is not None else torch.empty(shape, dtype=first.dtype)
    torch.stack(values, out=out)
    return out.permute(0, 3, 1, 2) if channels_last else out


def _collate_values(values: list[Any], pool: BufferPool | None) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
        return _batch_tensor(values, pool) if _stackable(values) else values
    if isinstance(first, np.ndarray) and all(isinstance(v, np.ndarray) for v in values):
        # Object/string arrays cannot become tensors; keep them as a list.
        if first.dtype.kind in "biuf" and _stackable(values):
            return _batch_tensor([torch.from_numpy(np.ascontiguousarray(v)) for v in values], pool)
        return values
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return torch.tensor([bool(v) for v in values])
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    return values


def collate_dicts(
    samples: list[dict[str, Any]],
    pool: BufferPool | None = None,
    on_corrupt: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Batch a list of dicts that share the same keys.

    Tensors and numeric numpy arrays of equal shape are stacked (new leading batch dim B);
    ints -> int64 (B,), floats -> float32 (B,), bools -> bool (B,); everything else
    (strings, ragged arrays, nested lists such as per-image person lists) stays a length-B list.
    Keys missing from some samples are an error naming the key. With a ``pool`` (a DataLoader
    worker's :class:`~sapiens.data.batch_buffers.BufferPool`) tensors go into reusable shared
    memory and the result is a :class:`~sapiens.data.batch_buffers.PooledBatch`.

    :class:`~sapiens.data.device_resize.DeviceCrop` values (``PretrainTransform(resize_on=
    "device")``) are decoded here, into the batch buffer; a sample whose JPEG turns out to be
    corrupt is left out of the batch and reported to ``on_corrupt(message)`` (the shard
    pipeline counts it as skipped), or raises :class:`CorruptSampleError` without one. Returns
    None when no sample is left.
    """
    if not samples:
        raise ValueError("collate_dicts needs at least one sample")
    keys = list(samples[0].keys())
    for i, sample in enumerate(samples[1:], start=1):
        if sample.keys() != samples[0].keys():
            diff = sorted(set(sample.keys()) ^ set(keys))
            raise ValueError(f"sample {i} of the batch has different keys than sample 0: {diff}")
    batch: dict[str, Any] = {}
    for key in [k for k in keys if isinstance(samples[0][k], DeviceCrop)]:  # first: may drop samples
        crops = [s[key] for s in samples]
        batch[key], failed = pack_device_crops(crops, pool)
        for index, reason in failed:
            error = CorruptSampleError(crops[index].key, reason, crops[index].url)
            if on_corrupt is None:
                raise error
            on_corrupt(str(error))
        dropped = {index for index, _ in failed}
        samples = [s for i, s in enumerate(samples) if i not in dropped]
        if not samples:
            if pool is not None:
                pool.discard_pending()
            return None
    for key in keys:
        if key not in batch:
            batch[key] = _collate_values([s[key] for s in samples], pool)
    return pool.wrap(batch) if pool is not None else batch
