"""``depth`` and ``normal`` subcommands: dense-label shards from images, .npy arrays and masks.

    python -m data.make_shards depth  --images DIR --arrays DIR [--masks DIR] --out OUT [--skip-bad]
    python -m data.make_shards normal --images DIR --arrays DIR [--masks DIR] --out OUT [--skip-bad]

Files are matched by stem: ``images/a.jpg`` <-> ``arrays/a.npy`` <-> ``masks/a.png``. Depth arrays
are float (H, W) camera z (0 on background); normal arrays float (H, W, 3) unit camera-space
normals (0 on background). Both are stored as float32 ``depth.npy`` / ``normal.npy``. Masks are
8-bit PNGs (non-zero = foreground), stored as 0/255 ``mask.png``; without ``--masks`` the mask is
derived from the array (depth > 0, normal != 0).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np

from data.converters.seg import (
    add_shard_arguments,
    encode_png,
    list_images_by_stem,
    read_image,
    read_label_png,
    sample_key,
    shard_options,
    write_shards,
)
from sapiens.data.shard_writer import ShardWriteSummary


def read_dense_array(path: Path, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """Load and check a depth (H, W) or normal (H, W, 3) array; returns float32.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable, wrong shape/dtype, non-finite.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} array missing (expected next to the image's stem)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    expected = shape if kind == "depth" else (*shape, 3)
    if array.shape != expected:
        raise ValueError(f"{path}: {kind} shape {array.shape} does not match its image {expected}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{path}: dtype {array.dtype} is not numeric")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: contains NaN or inf; write 0 for pixels without a {kind}")
    return array


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file bytes of an array."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def convert_dense(
    kind: str,
    images: str | Path,
    arrays: str | Path,
    out: str | Path,
    masks: str | Path | None = None,
    **shard_opts: Any,
) -> ShardWriteSummary:
    """Write ``depth`` or ``normal`` shards (see module docstring).

    ``shard_opts`` are passed to :func:`data.converters.seg.write_shards`.
    """
    if kind not in ("depth", "normal"):
        raise ValueError(f"kind must be 'depth' or 'normal', got {kind!r}")
    arrays = Path(arrays)
    if not arrays.is_dir():
        raise FileNotFoundError(f"{kind} array folder {arrays} does not exist")
    mask_dir = None if masks is None else Path(masks)
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist")

    def make(item: tuple[str, Path]) -> dict[str, Any]:
        stem, image_path = item
        jpg, shape = read_image(image_path)
        array = read_dense_array(arrays / f"{stem}.npy", kind, shape)
        if mask_dir is not None:
            fg = read_label_png(mask_dir / f"{stem}.png", shape) > 0
        else:
            fg = array > 0 if kind == "depth" else np.any(array != 0, axis=-1)
        return {
            "__key__": sample_key(stem),
            "jpg": jpg,
            f"{kind}.npy": npy_bytes(array),
            "mask.png": encode_png(fg.astype(np.uint8) * 255),
        }

    items = list(list_images_by_stem(images).items())
    return write_shards(items, make, out, f"{kind} -> shards", **shard_opts)


def _runner(kind: str):
    def run(args: argparse.Namespace) -> int:
        convert_dense(kind, args.images, args.arrays, args.out, args.masks, **shard_options(args))
        return 0

    return run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``depth`` and ``normal``."""
    for kind, what in (("depth", "camera z (H, W)"), ("normal", "unit normals (H, W, 3)")):
        parser = subparsers.add_parser(
            kind,
            help=f"{kind} shards (jpg + {kind}.npy + mask.png) from images, .npy {what}, masks",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--images", required=True, help="image folder")
        parser.add_argument("--arrays", required=True, help=f"folder of .npy {kind} arrays")
        parser.add_argument("--masks", default=None, help="folder of mask PNGs (optional)")
        add_shard_arguments(parser)
        parser.set_defaults(func=_runner(kind))
