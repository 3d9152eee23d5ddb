"""MAE pretraining augmentation: random resized crop and horizontal flip, uint8 output.

The transform decodes the JPEG itself (from ``read_pretrain_encoded``) so that it can decode at
the reduced DCT scale its crop allows: a crop at least twice the output size in both directions
is decoded at 1/2, 1/4 or 1/8 scale, which is 2-5x cheaper than a full decode and low-passes
the image as it shrinks. The resize then runs in the worker (cv2) or, with
``resize_on="device"``, on the accelerator (:mod:`sapiens.data.device_resize`). Normalisation
runs on the device (:func:`sapiens.data.normalize.normalize_images`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from sapiens.data.device_resize import DeviceCrop
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD, image_to_tensor
from sapiens.data.readers import CorruptSampleError, decode_image_bytes, decode_jpeg_at_size

# Kept for callers that imported the statistics from here.
IMAGENET_MEAN, IMAGENET_STD = IMAGE_MEAN, IMAGE_STD
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


def sample_resized_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Pick a crop box ``(top, left, crop_h, crop_w)`` the way torchvision's RandomResizedCrop does.

    The area fraction is uniform in ``scale`` and the aspect ratio (w / h) log-uniform in
    ``ratio``; after ``attempts`` boxes that do not fit, fall back to the largest centred crop
    whose aspect ratio is clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, round(height * max(ratio))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def dct_scale_for_crop(crop_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Largest JPEG DCT down-scale (8, 4, 2 or 1) that keeps the crop at least ``out_hw``.

    Only power-of-two factors are used: libjpeg-turbo's other factors (e.g. 8/7) can be slower
    than a full decode.
    """
    for factor in (8, 4, 2):
        if crop_hw[0] >= factor * out_hw[0] and crop_hw[1] >= factor * out_hw[1]:
            return factor
    return 1


class PretrainTransform:
    """Pretraining sample -> ``{"image": uint8 tensor (3, H, W)}`` (RGB 0..255).

    Input: ``{"encoded": bytes, "image_hw": (H, W) | None}`` from ``read_pretrain_encoded`` (the
    shard pipeline picks that reader because ``reads_encoded`` is True), or an already decoded
    ``{"image": (H, W, 3) uint8 array}``. With ``resize_on="device"`` the output ``image`` is a
    :class:`~sapiens.data.device_resize.DeviceCrop` (the crop planned, the JPEG not yet decoded)
    that the batch collate decodes into shared memory and the LightningModule crops and resizes
    after the transfer.

    The image is not normalised here: the LightningModule does it on the device after the
    batch transfer (:func:`sapiens.data.normalize.normalize_images`), which keeps the workers
    cheap and the batches 4x smaller.

    Args:
        image_size: output (H, W), or one int for a square.
        scale: range of the crop's area fraction of the image.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
        hflip_prob: probability of a horizontal flip.
        interpolation: ``bicubic`` (default, as MAE), ``bilinear``, ``area`` or ``nearest``.
        antialias: low-pass down-scales, as the published recipe's Pillow resize does. Crops at
            least twice the output size are decoded at 1/2, 1/4 or 1/8 scale (the DCT low-passes),
            and a crop still twice the output size is resized with ``cv2.INTER_AREA`` (cv2's
            cubic resize does not low-pass); on the device, ``F.interpolate(antialias=True)``.
            The earlier ``cv2.pyrDown`` halving blurred 5-13 grey levels away from Pillow's
            result; these stay within 1 (tests/test_pipeline_speedups.py).
        resize_on: ``worker`` (cv2, in the DataLoader worker) or ``device`` (the accelerator;
            frees ~40% of a worker's time at 1024 px, see ``device_resize``).
        fast_decode: libjpeg-turbo's fast integer IDCT and chroma upsampling (~10% faster decode,
            differences of a grey level or two).
        seed: seed of the private RNG; the shard pipeline calls :meth:`reseed` per
            (seed, epoch, rank, worker), which makes streams reproducible.
    """

    reads_encoded = True  # the shard pipeline hands over undecoded images

    def __init__(
        self,
        image_size: int | Sequence[int] = (224, 224),
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        interpolation: str = "bicubic",
        antialias: bool = True,
        resize_on: str = "worker",
        fast_decode: bool = False,
        seed: int | None = None,
    ):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive ints, got {image_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}")
        if resize_on not in ("worker", "device"):
            raise ValueError(f"resize_on must be 'worker' or 'device', got {resize_on!r}")
        self.image_size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip_prob = float(hflip_prob)
        self.interpolation = interpolation
        self.antialias = antialias
        self.resize_on = resize_on
        self.fast_decode = bool(fast_decode)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the private RNG (called by the shard pipeline at each worker/epoch start)."""
        self.rng = np.random.default_rng(seed)

    def _source(self, sample: dict[str, Any]) -> tuple[np.ndarray | None, bytes | None, tuple[int, int]]:
        """``(image, None, (H, W))`` for a decoded or non-JPEG image (decoded here), or
        ``(None, jpeg_bytes, (H, W))`` for a JPEG, to be decoded once the crop is known."""
        if "image" in sample:
            image = sample["image"]
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
                got = getattr(image, "shape", type(image).__name__)
                raise ValueError(f"PretrainTransform expects an (H, W, 3) uint8 array, got {got}")
            return image, None, image.shape[:2]
        if "encoded" not in sample:
            raise ValueError(f"PretrainTransform needs 'image' or 'encoded', got keys {sorted(sample)}")
        if sample.get("image_hw") is not None:
            return None, sample["encoded"], tuple(sample["image_hw"])
        image = self._decode(sample, lambda: decode_image_bytes(sample["encoded"]))
        return image, None, image.shape[:2]

    @staticmethod
    def _decode(sample: dict[str, Any], decode: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return decode()
        except ValueError as err:
            key = str(sample.get("key", "?"))
            raise CorruptSampleError(key, f"image: {err}", sample.get("url")) from None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Sample -> ``{"image": uint8 (3, out_h, out_w)}``, or a ``DeviceCrop`` (``resize_on="device"``)."""
        image, jpeg, hw = self._source(sample)
        box = sample_resized_crop(*hw, self.scale, self.ratio, self.rng)
        factor = dct_scale_for_crop(box[2:], self.image_size) if jpeg is not None else 1
        decoded_hw = (-(-hw[0] // factor), -(-hw[1] // factor))
        top, left, crop_h, crop_w = scale_box(box, hw, decoded_hw)
        if self.resize_on == "device":
            flip = bool(self.rng.random() < self.hflip_prob)
            return {
                "image": DeviceCrop(
                    self.image_size,
                    (top, left, crop_h, crop_w),
                    flip,
                    decoded_hw,
                    pixels=image,
                    encoded=jpeg,
                    fast_decode=self.fast_decode,
                    interpolation=self.interpolation,
                    antialias=self.antialias,
                    key=str(sample.get("key", "?")),
                    url=sample.get("url"),
                )
            }
        if image is None:
            image = self._decode(sample, lambda: decode_jpeg_at_size(jpeg, decoded_hw, self.fast_decode))
        crop = image[top : top + crop_h, left : left + crop_w]
        return {"image": image_to_tensor(self.resize_and_flip(crop, self.image_size))}

    def resize_and_flip(self, crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 crop -> (H, W, 3) at ``size``, flipped with probability ``hflip_prob``.

        Crops at least twice the output size are resized with ``cv2.INTER_AREA`` when ``antialias``."""
        out_h, out_w = size
        interpolation = INTERPOLATIONS[self.interpolation]
        if self.antialias and crop.shape[0] >= 2 * out_h and crop.shape[1] >= 2 * out_w:
            interpolation = cv2.INTER_AREA  # a box filter: low-passes as Pillow's resize does
        resized = cv2.resize(crop, (out_w, out_h), interpolation=interpolation)
        if self.rng.random() < self.hflip_prob:
            resized = cv2.flip(resized, 1)  # a new array, not a negative-stride view
        return resized


def scale_box(
    box: tuple[int, int, int, int], hw: tuple[int, int], decoded_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A crop box ``(top, left, h, w)`` in pixels of an (H, W) image -> the same box in pixels of its
    reduced-scale decode of size ``decoded_hw`` (unchanged when the sizes are equal), kept inside it."""
    if tuple(decoded_hw) == tuple(hw):
        return box
    top, left, crop_h, crop_w = box
    sy, sx = decoded_hw[0] / hw[0], decoded_hw[1] / hw[1]
    top, left = int(top * sy), int(left * sx)
    crop_h = min(max(1, round(crop_h * sy)), decoded_hw[0] - top)
    crop_w = min(max(1, round(crop_w * sx)), decoded_hw[1] - left)
    return top, left, crop_h, crop_w
