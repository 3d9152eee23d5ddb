"""Multi-crop views of one image for self-distillation (DINO / iBOT / DINOv2): G global and M local
random-resized crops, uint8 out, normalised on the device.

Sample -> ``{"image": global view 0, "image_global1": ..., "image_local0": ...}`` (keys from
:func:`view_keys`), each a uint8 (3, H, W) tensor or, with ``resize_on="device"``, a
:class:`~sapiens.data.device_resize.DeviceCrop` that the batch collate packs and the LightningModule resizes
on the accelerator. Global view 0 sits under ``image`` so everything that reads a pretraining batch's
``image`` (throughput, reconstruction pictures) keeps working.

Speed: the JPEG is decoded once per sample, at the largest DCT down-scale that still leaves every view's crop
at least its output size (:func:`~sapiens.data.pretrain_transform.dct_scale_for_crop`), and every view is cut
from that one decode. On the device path only each view's crop pixels go into the batch buffer.
Defaults (DINOv2): 2 global crops with area scale (0.32, 1), 8 local crops at (0.05, 0.32) (here 0 local
crops by default: they are optional and cost an encoder pass each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sapiens.data.device_resize import DeviceCrop
from sapiens.data.normalize import image_to_tensor
from sapiens.data.pretrain_transform import (
    PretrainTransform,
    dct_scale_for_crop,
    sample_resized_crop,
    scale_box,
)
from sapiens.data.readers import decode_jpeg_at_size

GLOBAL_PREFIX, LOCAL_PREFIX = "image_global", "image_local"


def view_keys(num_global: int, num_local: int) -> tuple[list[str], list[str]]:
    """Batch keys of the global views (``image``, ``image_global1``, ...) and local views
    (``image_local0``, ...)."""
    return ["image"] + [f"{GLOBAL_PREFIX}{i}" for i in range(1, num_global)], [
        f"{LOCAL_PREFIX}{i}" for i in range(num_local)
    ]


def views_in_batch(batch: dict) -> tuple[list[str], list[str]]:
    """The global and local view keys present in a batch, in view order."""

    def index(key: str, prefix: str) -> int:
        return int(key[len(prefix) :])

    globals_ = sorted(
        (k for k in batch if k.startswith(GLOBAL_PREFIX)), key=lambda k: index(k, GLOBAL_PREFIX)
    )
    locals_ = sorted((k for k in batch if k.startswith(LOCAL_PREFIX)), key=lambda k: index(k, LOCAL_PREFIX))
    return ["image", *globals_], locals_


class MultiCropTransform(PretrainTransform):
    """Global and local random-resized crops of one image (flips drawn per view).

    Args:
        image_size: (H, W) of the global views (the pretraining input size).
        global_crops: G >= 1 (DINO / DINOv2: 2). scale: area fraction of global crops (DINOv2: 0.32-1).
        local_crops: M >= 0 (DINOv2: 8). local_size: (h, w) of local views (DINOv2: 96 px for 224 px
            globals). local_scale: area fraction of local crops (DINOv2: 0.05-0.32).
        ratio, hflip_prob, interpolation, antialias, resize_on, fast_decode, seed: as
            :class:`~sapiens.data.pretrain_transform.PretrainTransform`, for every view.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = (224, 224),
        global_crops: int = 2,
        scale: Sequence[float] = (0.32, 1.0),
        local_crops: int = 0,
        local_size: int | Sequence[int] = (96, 96),
        local_scale: Sequence[float] = (0.05, 0.32),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        interpolation: str = "bicubic",
        antialias: bool = True,
        resize_on: str = "worker",
        fast_decode: bool = False,
        seed: int | None = None,
    ):
        super().__init__(
            image_size, scale, ratio, hflip_prob, interpolation, antialias, resize_on, fast_decode, seed
        )
        if global_crops < 1 or local_crops < 0:
            raise ValueError(
                f"need global_crops >= 1 and local_crops >= 0, got {global_crops}, {local_crops}"
            )
        local = (local_size, local_size) if isinstance(local_size, int) else tuple(local_size)
        if len(local) != 2 or min(local) < 1:
            raise ValueError(f"local_size must be (H, W) with positive ints, got {local_size}")
        if not (0 < local_scale[0] <= local_scale[1] <= 1):
            raise ValueError(f"local_scale must satisfy 0 < lo <= hi <= 1, got {local_scale}")
        self.global_crops, self.local_crops = int(global_crops), int(local_crops)
        self.local_size = (int(local[0]), int(local[1]))
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))

    def views(self) -> list[tuple[str, tuple[int, int], tuple[float, float]]]:
        """(batch key, output size, area scale range) of every view."""
        global_keys, local_keys = view_keys(self.global_crops, self.local_crops)
        return [(k, self.image_size, self.scale) for k in global_keys] + [
            (k, self.local_size, self.local_scale) for k in local_keys
        ]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Sample -> ``{key: uint8 (3, h, w) | DeviceCrop}`` for every view."""
        image, jpeg, hw = self._source(sample)
        views = self.views()
        boxes = [sample_resized_crop(*hw, scale, self.ratio, self.rng) for _, _, scale in views]
        factor = 1
        if jpeg is not None:
            factor = min(
                dct_scale_for_crop(box[2:], size) for box, (_, size, _) in zip(boxes, views, strict=True)
            )
        decoded_hw = (-(-hw[0] // factor), -(-hw[1] // factor))
        if image is None:
            image = self._decode(sample, lambda: decode_jpeg_at_size(jpeg, decoded_hw, self.fast_decode))
        out: dict[str, Any] = {}
        for (key, size, _), box in zip(views, boxes, strict=True):
            top, left, crop_h, crop_w = scale_box(box, hw, decoded_hw)
            crop = image[top : top + crop_h, left : left + crop_w]
            if self.resize_on == "device":  # only the crop's pixels travel; one decode for all views
                flip = bool(self.rng.random() < self.hflip_prob)
                out[key] = DeviceCrop(
                    size,
                    (0, 0, crop_h, crop_w),
                    flip,
                    (crop_h, crop_w),
                    pixels=crop,
                    interpolation=self.interpolation,
                    antialias=self.antialias,
                    key=str(sample.get("key", "?")),
                )
            else:
                out[key] = image_to_tensor(self.resize_and_flip(crop, size))
        return out
