"""Decode raw WebDataset samples (``{"__key__": str, ext: bytes}``) of each shard type into numpy.

Every reader takes the raw sample dict produced by the tar iterator and returns plain numpy
arrays; any failure (missing entry, undecodable bytes, inconsistent shapes) raises
:class:`CorruptSampleError` naming the sample key, so the pipeline can skip and count it.

Shard schemas (what ``data/make_shards.py`` writes; one tar member per entry, ``jpg`` may also be
``jpeg`` or ``png``):

- pretrain: ``jpg``;
- pose: ``jpg`` + ``json`` = ``{"image_id": int, "width": int, "height": int, "persons": [{"id": int,
  "bbox": [x, y, w, h], "area": float, "iscrowd": 0|1, "keypoints": [[x, y, v], ...]}]}``
  (K rows in the keypoint set's order, v = 0 unlabelled / 1 occluded / 2 visible);
- seg: ``jpg`` + ``seg.png`` (8-bit class ids, 255 = ignore);
- depth: ``jpg`` + ``depth.npy`` (H, W) float + ``mask.png`` (nonzero = valid);
- normal: ``jpg`` + ``normal.npy`` (H, W, 3) float unit vectors + ``mask.png``;
- pointmap: ``jpg`` + ``depth.npy`` (H, W) float camera z in metres (0 = unknown) + ``mask.png`` +
  ``intrinsics.json`` = ``{"fx", "fy", "cx", "cy"}`` in the image's pixels, pixel centres at integer
  coordinates (OpenCV), so X = (u - cx) Z / fx for the pixel in column u.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import simplejpeg

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded; carries the sample key and the reason."""

    def __init__(self, key: str, reason: str, url: str | None = None):
        self.key = key
        self.reason = reason
        self.url = url
        where = f" in {url}" if url else ""
        super().__init__(f"corrupt sample {key!r}{where}: {reason}")


def _key(sample: dict[str, Any]) -> str:
    return str(sample.get("__key__", "<no __key__>"))


def _fail(sample: dict[str, Any], reason: str) -> CorruptSampleError:
    return CorruptSampleError(_key(sample), reason, sample.get("__url__"))


def _entry(sample: dict[str, Any], ext: str) -> bytes:
    value = sample.get(ext)
    if value is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise _fail(sample, f"missing entry '{ext}' (present: {present})")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(sample, f"entry '{ext}' is {type(value).__name__}, expected raw bytes")
    return bytes(value)


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts with the JPEG SOI marker and a segment marker."""
    return data[:3] == b"\xff\xd8\xff"


def decode_jpeg_at_size(
    data: bytes, size_hw: tuple[int, int], fast: bool = False, buffer: np.ndarray | None = None
) -> np.ndarray:
    """(h, w, 3) uint8 RGB of the JPEG ``data`` decoded at the DCT scale whose output is ``size_hw``:
    the full size, or ceil(H / f) x ceil(W / f) for f = 2, 4, 8 (cheaper to decode). Written into
    ``buffer`` (flat uint8, h * w * 3 long) when given. ``fast``: libjpeg-turbo's fast integer IDCT
    and chroma upsampling.

    Raises:
        ValueError: the bytes do not decode, or not to ``size_hw``.
    """
    h, w = size_hw
    try:
        image = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=fast, fastupsample=fast, min_height=h, min_width=w, buffer=buffer
        )
    except RuntimeError as err:  # libjpeg-turbo reports some broken streams this way
        raise ValueError(str(err)) from None
    if image.shape[:2] != (h, w):
        raise ValueError(f"decoded to {image.shape[:2]}, expected {(h, w)}")
    return image


def cv2_decode(data: bytes, flags: int) -> np.ndarray | None:
    """``cv2.imdecode`` that returns None for anything it cannot decode: cv2 raises ``cv2.error``
    instead of returning None for some inputs (an empty buffer: ``!buf.empty()``)."""
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode JPEG (simplejpeg; cv2 fallback for e.g. CMYK) or PNG/WebP (cv2) bytes.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        ValueError: if the bytes are not a decodable image (including zero bytes).
    """
    if not data:
        raise ValueError("empty image (0 bytes)")
    if is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ValueError, RuntimeError):
            pass  # libjpeg-turbo cannot do everything (e.g. some CMYK files): try cv2.
    bgr = cv2_decode(data, cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or bgr.size == 0:
        raise ValueError(f"not a decodable image ({len(data)} bytes, starts {data[:8]!r})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _image_entry(sample: dict[str, Any]) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image entry (``jpg``, ``jpeg`` or ``png``)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), "jpg")
    return ext, _entry(sample, ext)


def _image(sample: dict[str, Any]) -> np.ndarray:
    ext, data = _image_entry(sample)
    try:
        return decode_image_bytes(data)
    except ValueError as err:
        raise _fail(sample, f"'{ext}': {err}") from None


def _gray_png(sample: dict[str, Any], ext: str, shape: tuple[int, int]) -> np.ndarray:
    data = _entry(sample, ext)
    array = cv2_decode(data, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise _fail(sample, f"'{ext}' is not a decodable PNG ({len(data)} bytes)")
    if array.ndim != 2 or array.dtype != np.uint8:
        raise _fail(
            sample,
            f"'{ext}' must be an 8-bit single-channel PNG, got shape {array.shape} {array.dtype}",
        )
    if array.shape != shape:
        raise _fail(sample, f"'{ext}' has shape {array.shape}, image is {shape}")
    return array


def _npy(sample: dict[str, Any], ext: str, shape: tuple[int, ...]) -> np.ndarray:
    data = _entry(sample, ext)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise _fail(sample, f"'{ext}' is not a valid .npy array: {err}") from None
    if array.shape != shape:
        raise _fail(sample, f"'{ext}' has shape {array.shape}, expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise _fail(sample, f"'{ext}' has dtype {array.dtype}, expected float")
    return array.astype(np.float32, copy=False)


def read_pretrain(sample: dict[str, Any]) -> dict[str, Any]:
    """Pretraining sample -> ``{"image": (H, W, 3) uint8 RGB, "key": str}``."""
    return {"image": _image(sample), "key": _key(sample)}


def read_pretrain_encoded(sample: dict[str, Any]) -> dict[str, Any]:
    """Pretraining sample -> ``{"encoded": bytes, "image_hw": (H, W), "key": str, "url": str | None}``,
    not decoded.

    For transforms that decode themselves (``PretrainTransform`` decodes JPEGs at the reduced
    DCT scale its crop allows). ``image_hw`` comes from the JPEG header (None for other formats
    and unreadable headers); undecodable bytes are found, and skipped, when the transform decodes.
    ``url`` is the shard the sample came from, for the transform's skip messages.
    """
    _, data = _image_entry(sample)
    hw = None
    if is_jpeg(data):
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            hw = (int(h), int(w))
        except (ValueError, RuntimeError):
            pass  # left to the full decoder (and its cv2 fallback) in the transform
    return {"encoded": data, "image_hw": hw, "key": _key(sample), "url": sample.get("__url__")}


def _person(sample: dict[str, Any], raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(sample, f"json persons[{index}] is {type(raw).__name__}, expected an object")
    try:
        bbox = np.asarray(raw["bbox"], dtype=np.float32)
        keypoints = np.asarray(raw["keypoints"], dtype=np.float32)
        person = {
            "id": int(raw.get("id", index)),
            "bbox": bbox,
            "area": float(raw.get("area", float(bbox[2] * bbox[3]) if bbox.shape == (4,) else 0)),
            "iscrowd": int(raw.get("iscrowd", 0)),
            "keypoints": keypoints,
        }
    except (KeyError, TypeError, ValueError) as err:
        raise _fail(sample, f"json persons[{index}]: bad or missing field ({err})") from None
    if bbox.shape != (4,):
        raise _fail(sample, f"json persons[{index}].bbox has shape {bbox.shape}, expected (4,)")
    if keypoints.ndim != 2 or keypoints.shape[1] != 3:
        raise _fail(sample, f"json persons[{index}].keypoints has shape {keypoints.shape}, expected (K, 3)")
    return person


def read_pose(sample: dict[str, Any]) -> dict[str, Any]:
    """Pose sample -> image, key, image_id, width, height and persons.

    Returns:
        ``{"image": (H, W, 3) uint8, "key": str, "image_id": int, "width": int, "height": int,
        "persons": [{"id": int, "bbox": float32 (4,) xywh, "area": float, "iscrowd": int,
        "keypoints": float32 (K, 3) x, y, visibility}]}``; K is the same for all persons.
    """
    image = _image(sample)
    try:
        meta = json.loads(_entry(sample, "json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(sample, f"'json' is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("persons"), list):
        raise _fail(sample, "'json' must be an object with a 'persons' list")
    height, width = image.shape[:2]
    if int(meta.get("width", width)) != width or int(meta.get("height", height)) != height:
        raise _fail(
            sample,
            f"json says {meta.get('width')}x{meta.get('height')} (WxH), image is {width}x{height}",
        )
    persons = [_person(sample, raw, i) for i, raw in enumerate(meta["persons"])]
    if len({p["keypoints"].shape[0] for p in persons}) > 1:
        raise _fail(sample, "persons have different keypoint counts")
    return {
        "image": image,
        "key": _key(sample),
        "image_id": int(meta.get("image_id", -1)),
        "width": width,
        "height": height,
        "persons": persons,
    }


def read_seg(sample: dict[str, Any]) -> dict[str, Any]:
    """Segmentation sample -> ``{"image", "key", "seg": (H, W) uint8 class ids, 255 ignore}``."""
    image = _image(sample)
    return {
        "image": image,
        "key": _key(sample),
        "seg": _gray_png(sample, "seg.png", image.shape[:2]),
    }


def read_depth(sample: dict[str, Any]) -> dict[str, Any]:
    """Depth sample -> ``{"image", "key", "depth": float32 (H, W), "mask": bool (H, W)}``."""
    image = _image(sample)
    hw = image.shape[:2]
    depth = _npy(sample, "depth.npy", hw)
    mask = _gray_png(sample, "mask.png", hw) > 0
    return {"image": image, "key": _key(sample), "depth": depth, "mask": mask}


def read_normal(sample: dict[str, Any]) -> dict[str, Any]:
    """Normal sample -> ``{"image", "key", "normal": float32 (H, W, 3), "mask": bool (H, W)}``."""
    image = _image(sample)
    hw = image.shape[:2]
    normal = _npy(sample, "normal.npy", (*hw, 3))
    mask = _gray_png(sample, "mask.png", hw) > 0
    return {"image": image, "key": _key(sample), "normal": normal, "mask": mask}


def parse_intrinsics(data: Any) -> np.ndarray:
    """``{"fx", "fy", "cx", "cy"}`` or ``{"K": 3x3}`` -> K (3, 3) float64.

    Raises:
        ValueError: missing keys, non-numbers, non-finite values or a focal length <= 0.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected an object with fx, fy, cx, cy (or K), got {type(data).__name__}")
    try:
        if "K" in data:
            k = np.asarray(data["K"], dtype=np.float64)
        else:
            fx, fy, cx, cy = (float(data[name]) for name in ("fx", "fy", "cx", "cy"))
            k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"needs numbers fx, fy, cx, cy (or a 3x3 K); {err!r}") from None
    if k.shape != (3, 3) or not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError(f"K must be 3x3, finite, with fx, fy > 0; got {k.tolist()}")
    return k


def read_pointmap(sample: dict[str, Any]) -> dict[str, Any]:
    """Pointmap sample -> ``{"image", "key", "depth": float32 (H, W), "mask": bool (H, W),
    "intrinsics": float64 (3, 3)}``."""
    out = read_depth(sample)
    raw = _entry(sample, "intrinsics.json")
    try:
        out["intrinsics"] = parse_intrinsics(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise _fail(sample, f"'intrinsics.json': {err}") from None
    return out


READERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pretrain": read_pretrain,
    "pose": read_pose,
    "seg": read_seg,
    "depth": read_depth,
    "normal": read_normal,
    "pointmap": read_pointmap,
}


# Readers that leave images encoded, used when the sample transform has ``reads_encoded = True``.
ENCODED_READERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pretrain": read_pretrain_encoded,
}


def get_reader(name: str | Callable[[dict[str, Any]], dict[str, Any]], encoded: bool = False) -> Callable:
    """Look up a reader by name (``pretrain``, ``pose``, ``seg``, ``depth``, ``normal``, ``pointmap``) or
    pass a
    callable through. ``encoded``: prefer the variant that leaves images encoded, if there is one."""
    if callable(name):
        return name
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; choose one of {sorted(READERS)}")
    return ENCODED_READERS.get(name, READERS[name]) if encoded else READERS[name]
