"""Per-sample augmentation for the dense tasks (part segmentation, relative depth, normals).

Geometry is one affine warp per array (cv2), composed from: a stretch of the source image to the
input size (what validation does), a random zoom ``r`` from ``scale_range`` about the centre, a
random in-plane rotation and a random translation of at most ``|r - 1| / 2`` of the output size
(a random crop when zoomed in, a random placement when zoomed out). A horizontal flip and, for
the image only, a photometric distortion follow. This stands in for the published chain
RandomResize -> RandomCrop -> Resize -> RandomRotate -> RandomFlip -> PhotoMetricDistortion.

Label handling:
* seg: nearest resampling; pixels outside the source image become 0 (background, as the
  published rotation pads the label with 0); 255 (ignore) is kept; a flip swaps left/right ids.
* depth: nearest resampling (no mixing of foreground with background); outside = 0, mask False.
  Depth values are not rescaled with the zoom: the training target is min-max normalised per
  image, which is invariant to that factor.
* normal: nearest resampling, then the in-plane rotation is applied to the (x, y) components of
  the vectors and a flip negates x. Vectors are renormalised on the foreground and 0 elsewhere.
  The non-uniform stretch to the input aspect ratio is not applied to the vectors (neither does
  the published pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch

from sapiens.data import normalize

# Re-exported: normalisation itself now runs on the device (``normalize_images``).
IMAGE_MEAN = np.array(normalize.IMAGE_MEAN, dtype=np.float32)
IMAGE_STD = np.array(normalize.IMAGE_STD, dtype=np.float32)
# Goliath left/right body-part ids swapped by a horizontal flip (Left_Foot<->Right_Foot, ...).
GOLIATH_SEG_SWAP_PAIRS: tuple[tuple[int, int], ...] = (
    (4, 13), (5, 14), (6, 15), (7, 16), (8, 17), (9, 18), (10, 19), (11, 20),
)  # fmt: skip
# Sapiens2's 29 classes add Eyeglass at id 2, so its pairs are Goliath's shifted by one (5<->14 ... 12<->21).
SAPIENS2_SEG_SWAP_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (a + 1, b + 1) for a, b in GOLIATH_SEG_SWAP_PAIRS
)
TASKS = ("seg", "depth", "normal", "pointmap")


class DenseTransform:
    """Decoded sample dict -> augmented torch tensors (image uint8, labels as below).

    Args:
        task: "seg", "depth", "normal" or "pointmap" (depth + intrinsics; no rotation).
        input_size: (H, W) of the network input, e.g. (1024, 768).
        train: random augmentation if True; otherwise a plain resize to ``input_size``.
        scale_range: (min, max) zoom factor, uniform.
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]); 0 disables.
        rotate_prob: probability of rotating.
        flip_prob: probability of a horizontal flip.
        photometric: random brightness / contrast / saturation / hue (mmseg
            PhotoMetricDistortion ranges) on the image in train mode.
        swap_pairs: label-id pairs swapped by a flip (seg only).
        label_map: seg ids are first mapped ``id -> label_map[id]`` (ids past its end are kept), e.g.
            Goliath's 28 classes onto Sapiens2's 29 (which inserts Eyeglass at 2).
        min_valid_pixels, max_valid_fraction, min_valid_depth: pointmap sample filters applied after the
            augmentation (published 16, 0.96, 0.04 m): a sample with fewer valid pixels, a larger valid share
            or a nearer valid depth is dropped (the transform returns None).
        normals_y_down: camera-space normals have +y pointing down the image (OpenCV camera).
            Set False for +y up (OpenGL); the rotation of the vectors then uses the mirrored angle.

    Input sample: {"key": str, "image": (H, W, 3) uint8 RGB, and per task
    "seg": (H, W) uint8 ids (255 ignore) | "depth": (H, W) float32 + "mask": (H, W) bool/uint8 |
    "normal": (H, W, 3) float32 + "mask" | "pointmap": "depth" + "mask" + "intrinsics" (3, 3) K, pixel
    centres at integer coordinates}.

    Output: {"key": str, "image": (3, h, w) uint8 RGB (normalised on the device by
    ``sapiens.data.normalize.normalize_images``), and
    "seg": (h, w) int64 | "depth": (h, w) float32 + "mask": (h, w) bool |
    "normal": (3, h, w) float32 + "mask": (h, w) bool | "pointmap": "depth" + "mask" + "intrinsics" (3, 3)
    float32, K of the output pixels (zoom, crop and flip applied to it)}.
    """

    def __init__(
        self,
        task: Literal["seg", "depth", "normal", "pointmap"],
        input_size: Sequence[int],
        train: bool,
        scale_range: Sequence[float] = (0.5, 2.0),
        rotate: float = 30.0,
        rotate_prob: float = 0.5,
        flip_prob: float = 0.5,
        photometric: bool = True,
        swap_pairs: Sequence[Sequence[int]] = GOLIATH_SEG_SWAP_PAIRS,
        normals_y_down: bool = True,
        label_map: Sequence[int] | None = None,
        min_valid_pixels: int = 16,
        max_valid_fraction: float = 0.96,
        min_valid_depth: float = 0.04,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"DenseTransform: task must be one of {TASKS}, got {task!r}")
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"DenseTransform: input_size must be (H, W), got {input_size}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"DenseTransform: scale_range must be (min, max) > 0, got {scale_range}")
        if task == "pointmap" and train and rotate > 0:
            raise ValueError(
                "DenseTransform: rotate must be 0 for pointmap (a rotated crop is no pinhole camera with "
                "these intrinsics)"
            )
        self.task = task
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.train = train
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotate = float(rotate)
        self.rotate_prob = rotate_prob
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.normals_y_down = normals_y_down
        self.flip_lut = np.arange(256, dtype=np.uint8)
        for a, b in swap_pairs:
            self.flip_lut[a], self.flip_lut[b] = b, a
        self.label_lut = np.arange(256, dtype=np.uint8)
        if label_map is not None:
            self.label_lut[: len(label_map)] = np.asarray(label_map, dtype=np.uint8)
        self.filters = (int(min_valid_pixels), float(max_valid_fraction), float(min_valid_depth))

    # ------------------------------------------------------------------ entry point
    def __call__(
        self, sample: Mapping[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any] | None:
        """Transform one decoded sample (see class doc); None when a pointmap filter drops it. ``rng``
        defaults to one seeded from torch's RNG, so ``torch.manual_seed`` / per-worker seeding make runs
        reproducible."""
        arrays = self._validated(sample)
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        angle, flip = 0.0, False
        if self.train:
            matrix, angle = self._random_affine(arrays["image"].shape[:2], rng)
            arrays = self._warp(arrays, matrix)
            flip = rng.random() < self.flip_prob
        elif self.task == "pointmap":  # an explicit matrix, so that K follows the pixels exactly
            arrays = self._warp(arrays, self._stretch(arrays["image"].shape[:2]))
        else:
            arrays = self._resize(arrays)
        if self.task == "normal":
            arrays["normal"] = self._rotate_vectors(arrays["normal"], angle, arrays["mask"])
        if flip:
            arrays = self._flip(arrays)
        image = arrays["image"]
        if self.train and self.photometric:
            image = _photometric_distortion(image, rng)
        out: dict[str, Any] = {"key": sample.get("key", ""), "image": normalize.image_to_tensor(image)}
        if self.task == "seg":
            out["seg"] = torch.from_numpy(np.ascontiguousarray(arrays["seg"])).long()
        elif self.task in ("depth", "pointmap"):
            out["depth"] = torch.from_numpy(np.ascontiguousarray(arrays["depth"], np.float32))
            out["mask"] = torch.from_numpy(np.ascontiguousarray(arrays["mask"]))
            if self.task == "pointmap":
                out["intrinsics"] = torch.from_numpy(arrays["intrinsics"].astype(np.float32))
                return out if self._keep(arrays["depth"], arrays["mask"]) else None
        else:
            normal = np.ascontiguousarray(arrays["normal"].transpose(2, 0, 1), np.float32)
            out["normal"] = torch.from_numpy(normal)
            out["mask"] = torch.from_numpy(np.ascontiguousarray(arrays["mask"]))
        return out

    # ------------------------------------------------------------------ validation
    def _validated(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        key = sample.get("key", "<no key>")
        image = sample.get("image")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"sample {key!r}: 'image' must be an (H, W, 3) uint8 array, got {got}")
        if image.dtype != np.uint8:
            raise ValueError(f"sample {key!r}: 'image' must be uint8, got {image.dtype}")
        size = image.shape[:2]
        arrays = {"image": image}
        label_key = "depth" if self.task == "pointmap" else self.task
        label = sample.get(label_key)
        expected = (*size, 3) if self.task == "normal" else size
        if not isinstance(label, np.ndarray) or label.shape != expected:
            got = getattr(label, "shape", None if label is None else type(label).__name__)
            raise ValueError(
                f"sample {key!r}: task {self.task!r} needs '{label_key}' of shape {expected} "
                f"(same H, W as the image), got {got}"
            )
        if self.task == "seg":
            if label.dtype != np.uint8:
                raise ValueError(f"sample {key!r}: 'seg' must be uint8 class ids, got {label.dtype}")
            arrays["seg"] = self.label_lut[label]
            return arrays
        mask = sample.get("mask")
        if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if not isinstance(mask, np.ndarray) or mask.shape != size:
            got = getattr(mask, "shape", None if mask is None else type(mask).__name__)
            raise ValueError(
                f"sample {key!r}: task {self.task!r} needs a 'mask' of shape {size} "
                f"(bool or uint8 0/255 foreground), got {got}"
            )
        arrays[label_key] = label.astype(np.float32, copy=False)
        arrays["mask"] = mask > 0
        if self.task == "pointmap":
            k = np.asarray(sample.get("intrinsics"), dtype=np.float64)
            if k.shape != (3, 3) or not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
                raise ValueError(
                    f"sample {key!r}: pointmap needs 'intrinsics' K (3, 3) with fx, fy > 0, got {k}"
                )
            arrays["intrinsics"] = k
        return arrays

    def _keep(self, depth: np.ndarray, mask: np.ndarray) -> bool:
        """The published pointmap sample filters (class doc)."""
        min_pixels, max_fraction, min_depth = self.filters
        valid = mask & (depth > 0)
        count = int(valid.sum())
        return min_pixels <= count <= max_fraction * valid.size and float(depth[valid].min()) >= min_depth

    # ------------------------------------------------------------------ geometry
    def _random_affine(
        self, source_size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """2x3 matrix mapping source pixel coords to output pixel coords, and the angle (deg)."""
        src_h, src_w = source_size
        out_h, out_w = self.input_size
        zoom = rng.uniform(*self.scale_range)
        angle = 0.0
        if self.rotate > 0 and rng.random() < self.rotate_prob:
            angle = rng.uniform(-self.rotate, self.rotate)
        shift_x = rng.uniform(-1, 1) * abs(zoom - 1) * out_w / 2
        shift_y = rng.uniform(-1, 1) * abs(zoom - 1) * out_h / 2
        # Same sign convention as cv2.getRotationMatrix2D: positive = counter-clockwise on screen.
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        rotation = np.array([[cos, sin], [-sin, cos]])
        stretch = np.diag([out_w / src_w, out_h / src_h]) * zoom
        linear = rotation @ stretch
        src_centre = np.array([(src_w - 1) / 2, (src_h - 1) / 2])  # pixel centres at integers
        out_centre = np.array([(out_w - 1) / 2 + shift_x, (out_h - 1) / 2 + shift_y])
        offset = out_centre - linear @ src_centre
        return np.hstack([linear, offset[:, None]]), angle

    def _warp(self, arrays: dict[str, np.ndarray], matrix: np.ndarray) -> dict[str, np.ndarray]:
        out_h, out_w = self.input_size

        def warp(array: np.ndarray, interpolation: int, border: float) -> np.ndarray:
            return cv2.warpAffine(
                array,
                matrix,
                (out_w, out_h),
                flags=interpolation,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=border,
            )

        result = {"image": warp(arrays["image"], cv2.INTER_LINEAR, 0)}
        if "intrinsics" in arrays:  # u' = A u + b for every pixel, so K' = [[A, b], [0, 1]] K
            result["intrinsics"] = np.vstack([matrix, [0.0, 0.0, 1.0]]) @ arrays["intrinsics"]
        if self.task == "seg":
            result["seg"] = warp(arrays["seg"], cv2.INTER_NEAREST, 0)
        elif self.task == "pointmap":
            result["depth"] = warp(arrays["depth"], cv2.INTER_NEAREST, 0)
            result["mask"] = warp(arrays["mask"].astype(np.uint8), cv2.INTER_NEAREST, 0) > 0
        else:
            result[self.task] = warp(arrays[self.task], cv2.INTER_NEAREST, 0)
            result["mask"] = warp(arrays["mask"].astype(np.uint8), cv2.INTER_NEAREST, 0) > 0
        return result

    def _stretch(self, source_size: tuple[int, int]) -> np.ndarray:
        """2x3 matrix of the plain resize to ``input_size`` with pixel centres mapped onto pixel centres."""
        (src_h, src_w), (out_h, out_w) = source_size, self.input_size
        ax, ay = out_w / src_w, out_h / src_h
        return np.array([[ax, 0.0, 0.5 * ax - 0.5], [0.0, ay, 0.5 * ay - 0.5]])

    def _resize(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_h, out_w = self.input_size
        result = {"image": cv2.resize(arrays["image"], (out_w, out_h), cv2.INTER_LINEAR)}
        for name, array in arrays.items():
            if name == "image":
                continue
            resized = cv2.resize(
                array.astype(np.uint8) if name == "mask" else array,
                (out_w, out_h),
                interpolation=cv2.INTER_NEAREST,
            )
            result[name] = resized > 0 if name == "mask" else resized
        return result

    def _rotate_vectors(self, normal: np.ndarray, angle: float, mask: np.ndarray) -> np.ndarray:
        """Rotate the (x, y) components like the image content; renormalise on the foreground."""
        normal = normal.astype(np.float32, copy=True)
        if angle:
            # Image content moved by [[cos, sin], [-sin, cos]] in (x right, y down) pixel axes;
            # with +y up the same motion is the mirrored rotation.
            theta = math.radians(angle if self.normals_y_down else -angle)
            cos, sin = math.cos(theta), math.sin(theta)
            x, y = normal[..., 0].copy(), normal[..., 1].copy()
            normal[..., 0] = cos * x + sin * y
            normal[..., 1] = -sin * x + cos * y
        length = np.linalg.norm(normal, axis=-1, keepdims=True)
        good = mask & (length[..., 0] > 1e-6)
        normal = np.where(good[..., None], normal / np.maximum(length, 1e-6), 0.0)
        return normal.astype(np.float32)

    def _flip(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        flipped = {name: array[:, ::-1] for name, array in arrays.items() if name != "intrinsics"}
        if "intrinsics" in arrays:  # u' = W - 1 - u: cx' = W - 1 - cx and X flips sign (a mirrored world)
            k = arrays["intrinsics"].copy()
            k[0, 2] = self.input_size[1] - 1 - k[0, 2]
            flipped["intrinsics"] = k
        if self.task == "seg":
            flipped["seg"] = self.flip_lut[flipped["seg"]]
        elif self.task == "normal":
            normal = flipped["normal"].copy()
            normal[..., 0] *= -1
            flipped["normal"] = normal
        return flipped


def _photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness (+-32), contrast (x0.5-1.5), saturation (x0.5-1.5), hue (+-36 deg),
    each with probability 0.5, contrast before or after the colour changes. uint8 -> uint8."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        img = img * contrast
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue_shift = rng.uniform(-36, 36) if rng.random() < 0.5 else None
    if saturation is not None or hue_shift is not None:
        hsv = cv2.cvtColor(np.clip(img, 0, 255) / 255.0, cv2.COLOR_RGB2HSV)  # H in [0, 360)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        if hue_shift is not None:
            hsv[..., 0] = (hsv[..., 0] + hue_shift) % 360
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    if not contrast_first and contrast is not None:
        img = img * contrast
    return np.clip(img, 0, 255).astype(np.uint8)
