"""``pointmap`` subcommand: Sapiens2 pointmap shards from images, depth arrays, camera intrinsics and masks.

    python -m data.make_shards pointmap --images DIR --depths DIR --intrinsics DIR|FILE [--masks DIR] \
        --out OUT [--skip-bad]

Files are matched by stem: ``images/a.jpg`` <-> ``depths/a.npy`` <-> ``intrinsics/a.json`` <->
``masks/a.png``.
Depth arrays are float (H, W) camera z in metres (0 where unknown). Intrinsics are JSON
``{"fx", "fy", "cx", "cy"}`` (or ``{"K": [[...], [...], [...]]}``) in the image's pixels with pixel centres at
integer coordinates (OpenCV: X = (u - cx) Z / fx for column u); ``--intrinsics FILE.json`` gives one
camera for every image. Masks are 8-bit PNGs (non-zero = foreground); without ``--masks`` the mask is
depth > 0.
Stored per sample: ``jpg``, ``depth.npy`` (float32), ``mask.png`` (0/255) and ``intrinsics.json``; training
computes the XYZ targets from them (``sapiens.tasks.pointmap``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data.converters.dense import npy_bytes, read_dense_array
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
from sapiens.data.readers import parse_intrinsics
from sapiens.data.shard_writer import ShardWriteSummary


def read_intrinsics(path: Path) -> dict[str, float]:
    """``{"fx", "fy", "cx", "cy"}`` from a JSON file; FileNotFoundError / ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: intrinsics missing (expected next to the image's stem)")
    try:
        k = parse_intrinsics(json.loads(path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path}: bad intrinsics ({err})") from None
    return {"fx": float(k[0, 0]), "fy": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2])}


def convert_pointmap(
    images: str | Path,
    depths: str | Path,
    intrinsics: str | Path,
    out: str | Path,
    masks: str | Path | None = None,
    **shard_opts: Any,
) -> ShardWriteSummary:
    """Write pointmap shards (see module docstring); ``shard_opts`` go to
    :func:`data.converters.seg.write_shards`."""
    depths, intrinsics = Path(depths), Path(intrinsics)
    if not depths.is_dir():
        raise FileNotFoundError(f"depth array folder {depths} does not exist")
    if not intrinsics.exists():
        raise FileNotFoundError(f"intrinsics {intrinsics} do not exist (a folder of <stem>.json or one file)")
    shared = read_intrinsics(intrinsics) if intrinsics.is_file() else None
    mask_dir = None if masks is None else Path(masks)
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist")

    def make(item: tuple[str, Path]) -> dict[str, Any]:
        stem, image_path = item
        jpg, shape = read_image(image_path)
        depth = read_dense_array(depths / f"{stem}.npy", "depth", shape)
        camera = shared if shared is not None else read_intrinsics(intrinsics / f"{stem}.json")
        fg = read_label_png(mask_dir / f"{stem}.png", shape) > 0 if mask_dir is not None else depth > 0
        return {
            "__key__": sample_key(stem),
            "jpg": jpg,
            "depth.npy": npy_bytes(depth),
            "mask.png": encode_png(fg.astype("uint8") * 255),
            "intrinsics.json": json.dumps(camera).encode(),
        }

    items = list(list_images_by_stem(images).items())
    return write_shards(items, make, out, "pointmap -> shards", **shard_opts)


def run(args: argparse.Namespace) -> int:
    convert_pointmap(args.images, args.depths, args.intrinsics, args.out, args.masks, **shard_options(args))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pointmap``."""
    parser = subparsers.add_parser(
        "pointmap",
        help="pointmap shards (jpg + depth.npy + mask.png + intrinsics.json) from images, depths, cameras",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--depths", required=True, help="folder of .npy depth arrays (camera z, metres)")
    parser.add_argument(
        "--intrinsics", required=True, help="folder of <stem>.json intrinsics, or one .json for all images"
    )
    parser.add_argument("--masks", default=None, help="folder of mask PNGs (optional; default depth > 0)")
    add_shard_arguments(parser)
    parser.set_defaults(func=run)
