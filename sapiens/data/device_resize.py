"""Random-resized-crop split between the data workers (decode) and the accelerator (crop, resize, flip).

At 1024 px the resize of a random-resized crop costs a CPU worker 40% of the JPEG decode
(cv2 bicubic, 1024x768 output: 0.95 ms against 2.4 ms to decode), and copying a decoded image
into the batch costs another 15%. With ``PretrainTransform(resize_on="device")`` the transform
only plans the crop (from the JPEG header); the batch collate then decodes every JPEG of the
batch straight into one flat shared-memory buffer (:func:`pack_device_crops`), and
:func:`resize_crops` crops, resizes and flips on the device, where it costs microseconds per
image. A worker then does little besides decoding.

Batch layout under ``batch["image"]`` (see :func:`is_packed`)::

    {"packed": uint8 (sum_i h_i * w_i * 3,), the decoded (h_i, w_i, 3) images one after another,
     "shapes": [(h_i, w_i), ...], "boxes": [(top, left, crop_h, crop_w), ...] in those pixels,
     "flip": [bool, ...], "size": (H, W), "interpolation": "bicubic", "antialias": True}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sapiens.data.batch_buffers import BufferPool
from sapiens.data.readers import decode_jpeg_at_size

__all__ = ["DeviceCrop", "is_packed", "pack_device_crops", "resize_crops"]


@dataclass
class DeviceCrop:
    """One sample for the device-side resize: an image, decoded or still a JPEG, and its crop.

    Attributes:
        size: output (H, W).
        box: crop ``(top, left, h, w)`` in pixels of the decoded image.
        flip: flip horizontally after resizing.
        decoded_hw: (h, w) of the decoded image.
        pixels: the decoded (h, w, 3) uint8 RGB image, or None to decode ``encoded`` when packing.
        encoded: JPEG bytes (used when ``pixels`` is None), decoded at the DCT scale that gives
            ``decoded_hw``.
        key, url: sample key and shard, for the message when the JPEG turns out to be corrupt.
    """

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    decoded_hw: tuple[int, int]
    pixels: np.ndarray | None = None
    encoded: bytes | None = None
    fast_decode: bool = False
    interpolation: str = "bicubic"
    antialias: bool = True
    key: str = "?"
    url: str | None = None

    def decode_into(self, out: np.ndarray) -> None:
        """Write the (h, w, 3) decoded image into ``out`` (flat uint8, h * w * 3 long)."""
        if self.pixels is not None:
            out.reshape(*self.decoded_hw, 3)[...] = self.pixels
        else:
            decode_jpeg_at_size(self.encoded, self.decoded_hw, self.fast_decode, buffer=out)


def pack_device_crops(
    crops: list[DeviceCrop], pool: BufferPool | None = None
) -> tuple[dict | None, list[tuple[int, str]]]:
    """Decode (or copy) the images of a batch into one flat uint8 tensor, in shared memory from
    ``pool`` inside a DataLoader worker. An image whose crop covers less than a quarter of it is
    cut down to the crop after decoding (fewer bytes to copy to the device for large photos).

    Returns:
        (the packed ``image`` entry, or None when no image could be decoded;
        ``[(index in crops, reason), ...]`` of the samples left out because their JPEG is corrupt).
    """
    size = crops[0].size
    if any(c.size != size for c in crops):
        sizes = sorted({c.size for c in crops})
        raise ValueError(f"crops of one batch must share the output size, got {sizes}")
    total = sum(c.decoded_hw[0] * c.decoded_hw[1] * 3 for c in crops)
    packed = pool.empty((total,), torch.uint8) if pool is not None else torch.empty(total, dtype=torch.uint8)
    flat = packed.numpy()
    shapes: list[tuple[int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    kept: list[DeviceCrop] = []
    failed: list[tuple[int, str]] = []
    offset = 0
    for index, crop in enumerate(crops):
        (h, w), (top, left, ch, cw) = crop.decoded_hw, crop.box
        n = h * w * 3
        try:
            crop.decode_into(flat[offset : offset + n])
        except ValueError as err:  # the next image overwrites whatever was written
            failed.append((index, f"image: {err}"))
            continue
        if 4 * ch * cw < h * w:  # a small crop of a big image: keep only the crop's pixels
            decoded = flat[offset : offset + n].reshape(h, w, 3)
            # Row r moves to an address at or before its source, so row by row is safe in place.
            for r in range(ch):
                flat[offset + r * cw * 3 : offset + (r + 1) * cw * 3] = decoded[
                    top + r, left : left + cw
                ].ravel()
            (h, w), (top, left), n = (ch, cw), (0, 0), ch * cw * 3
        shapes.append((h, w))
        boxes.append((top, left, ch, cw))
        kept.append(crop)
        offset += n
    if not kept:
        return None, failed
    image = {
        "packed": packed[:offset],
        "shapes": shapes,
        "boxes": boxes,
        "flip": [bool(c.flip) for c in kept],
        "size": tuple(size),
        "interpolation": crops[0].interpolation,
        "antialias": crops[0].antialias,
    }
    return image, failed


def is_packed(image: object) -> bool:
    """True for a batch's ``image`` entry built by :func:`pack_device_crops`."""
    return isinstance(image, dict) and "packed" in image and "boxes" in image


def resize_crops(image: dict) -> torch.Tensor:
    """Packed images -> uint8 (B, 3, H, W) crops on the device of ``image["packed"]``.

    Each crop is resized with ``F.interpolate`` in the transform's ``interpolation`` mode (with
    ``antialias``, bilinear and bicubic down-scales are low-passed as Pillow does), rounded and
    clamped to 0..255 as a uint8 image would be, then flipped.
    """
    packed, mode, antialias = image["packed"], image["interpolation"], image["antialias"]
    out_h, out_w = image["size"]
    out = torch.empty((len(image["shapes"]), 3, out_h, out_w), dtype=torch.uint8, device=packed.device)
    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"antialias": antialias and smooth, "align_corners": False if smooth else None}
    offset = 0
    for i, ((h, w), (top, left, ch, cw), flip) in enumerate(
        zip(image["shapes"], image["boxes"], image["flip"], strict=True)
    ):
        decoded = packed[offset : offset + h * w * 3].view(h, w, 3)
        offset += h * w * 3
        crop = decoded[top : top + ch, left : left + cw].permute(2, 0, 1)[None].float()
        if (ch, cw) != (out_h, out_w):
            crop = F.interpolate(crop, size=(out_h, out_w), mode=mode, **kwargs)
        if flip:
            crop = crop.flip(-1)
        out[i] = crop[0].round_().clamp_(0, 255).to(torch.uint8)
    return out
