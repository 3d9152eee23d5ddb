"""Collate a list of sample dicts into a batch dict (used inside DataLoader workers)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch


def _stackable(values: list[Any]) -> bool:
    first = values[0]
    return all(v.shape == first.shape and v.dtype == first.dtype for v in values)


def _batch_tensor(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack into one new contiguous (B, ...) tensor, in shared memory inside a DataLoader worker.

    Allocating the batch in shared memory up front (as torch's default collate does) saves the
    extra copy that sending a worker's tensor to the main process would otherwise make; stacking
    into a contiguous ``out`` also turns channel-first views of channel-last images
    (``image_to_tensor``) into a plain (B, 3, H, W) layout in the same single copy.
    """
    first = values[0]
    shape = (len(values), *first.shape)
    if torch.utils.data.get_worker_info() is not None:
        numel = len(values) * first.numel()
        storage = first.untyped_storage()._new_shared(numel * first.element_size())
        out = torch.empty(0, dtype=first.dtype).set_(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=first.dtype)
    return torch.stack(values, out=out)


def _collate_values(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
        return _batch_tensor(values) if _stackable(values) else values
    if isinstance(first, np.ndarray) and all(isinstance(v, np.ndarray) for v in values):
        # Object/string arrays cannot become tensors; keep them as a list.
        if first.dtype.kind in "biuf" and _stackable(values):
            return _batch_tensor([torch.from_numpy(np.ascontiguousarray(v)) for v in values])
        return values
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return torch.tensor([bool(v) for v in values])
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    return values


def collate_dicts(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch a list of dicts that share the same keys.

    Tensors and numeric numpy arrays of equal shape are stacked (new leading batch dim B);
    ints -> int64 (B,), floats -> float32 (B,), bools -> bool (B,); everything else
    (strings, ragged arrays, nested lists such as per-image person lists) stays a length-B list.
    Keys missing from some samples are an error naming the key.
    """
    if not samples:
        raise ValueError("collate_dicts needs at least one sample")
    keys = list(samples[0].keys())
    for i, sample in enumerate(samples[1:], start=1):
        if sample.keys() != samples[0].keys():
            diff = sorted(set(sample.keys()) ^ set(keys))
            raise ValueError(f"sample {i} of the batch has different keys than sample 0: {diff}")
    return {key: _collate_values([s[key] for s in samples]) for key in keys}
