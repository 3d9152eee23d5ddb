"""``seg`` subcommand: body-part segmentation shards (``jpg`` + ``seg.png``) from paired folders.

    python -m data.make_shards seg --images DIR --labels DIR --out OUT [--num-classes 28]
        [--skip-bad] [--shard-size-mb 256] [--max-count N] [--prefix shard] [--overwrite]

Images and label PNGs are matched by file stem (``images/a.jpg`` <-> ``labels/a.png``). Labels
must be 8-bit single-channel (or palette) PNGs of the image's size holding class ids
0..num_classes-1 or 255 (ignore). JPEG images are stored byte-for-byte. This module also holds
the pairing/validation helpers shared with the ``depth``/``normal`` converters.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from data.converters.images import IMAGE_SUFFIXES, load_as_jpeg
from sapiens.data.shard_writer import ShardWriteSummary, open_shard_writer

IGNORE_ID = 255


def list_images_by_stem(folder: str | Path) -> dict[str, Path]:
    """``{stem: path}`` of the images directly inside ``folder`` (sorted by stem).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no images, or two images share a stem (e.g. ``a.jpg`` and ``a.png``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise ValueError(
                f"{folder}: two images share the stem '{path.stem}' "
                f"({found[path.stem].name}, {path.name}); stems must be unique"
            )
        found[path.stem] = path
    if not found:
        raise ValueError(f"{folder}: no .jpg/.jpeg/.png/.webp images found")
    return found


def sample_key(stem: str) -> str:
    """A WebDataset key for a file stem (dots would be read as extension separators)."""
    return stem.replace(".", "_")


def read_image(path: Path) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of an image (JPEGs unchanged) and its (H, W); ValueError naming the file."""
    data = load_as_jpeg(path, verify=True)
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return data, (height, width)


def read_label_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An 8-bit single-channel (or palette-index) PNG as uint8 (H, W), checked against ``shape``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: unreadable, not 8-bit single-channel, or not of size ``shape``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file missing (expected next to the image's stem)")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(
                    f"{path}: expected an 8-bit single-channel or palette PNG, got mode {im.mode}"
                )
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable PNG ({err})") from None
    if array.shape != shape:
        raise ValueError(f"{path}: size {array.shape} (HxW) does not match its image {shape}")
    return array


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W) array."""
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def check_class_ids(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """ValueError naming ``path`` and the offending ids if any id is >= num_classes and != 255."""
    ids = np.unique(labels)
    bad = ids[(ids >= num_classes) & (ids != IGNORE_ID)]
    if bad.size:
        raise ValueError(
            f"{path}: class ids {bad.tolist()} are outside 0..{num_classes - 1} (255 = ignore); "
            "fix the labels or pass the right --num-classes"
        )


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the converters (output, shard size, bad-input handling)."""
    parser.add_argument("--out", required=True, help="output folder for PREFIX-NNNNNN.tar")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="roll-over size")
    parser.add_argument("--max-count", type=int, default=100_000, help="max samples per shard")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad items")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def write_shards(
    items: list[Any],
    make_sample: Callable[[Any], dict[str, Any]],
    out: str | Path,
    desc: str,
    skip_bad: bool = False,
    shard_size_mb: float = 256.0,
    max_count: int = 100_000,
    prefix: str = "shard",
    overwrite: bool = False,
    progress: bool = True,
) -> ShardWriteSummary:
    """Turn each item into a sample and write them; bad items raise or (``skip_bad``) are counted.

    ``make_sample`` raises ValueError/FileNotFoundError naming the bad file, or returns None to
    leave an item out silently (e.g. an image without persons).
    """
    with open_shard_writer(
        out,
        prefix=prefix,
        max_size_mb=shard_size_mb,
        max_count=max_count,
        total=len(items),
        desc=desc,
        progress=progress,
        overwrite=overwrite,
    ) as sink:
        for item in items:
            try:
                sample = make_sample(item)
            except (ValueError, FileNotFoundError) as err:
                if not skip_bad:
                    raise type(err)(f"{err} (pass --skip-bad to skip such items)") from None
                sink.skip(str(err))
                continue
            if sample is not None:
                sink.write(sample)
    if sink.summary.skipped:
        print(f"skipped {sink.summary.skipped} bad item(s)")
    if sink.summary.samples == 0:
        raise ValueError(f"no sample was written to {out} ({sink.summary.skipped} bad item(s))")
    return sink.summary


def _paired(images: str | Path, labels: str | Path) -> Iterator[tuple[str, Path, Path]]:
    labels = Path(labels)
    if not labels.is_dir():
        raise FileNotFoundError(f"label folder {labels} does not exist")
    for stem, path in list_images_by_stem(images).items():
        yield stem, path, labels / f"{stem}.png"


def convert_seg(
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    num_classes: int = 28,
    **shard_options: Any,
) -> ShardWriteSummary:
    """Write seg shards from an image folder and a label-PNG folder (see module docstring).

    ``shard_options`` are passed to :func:`write_shards` (skip_bad, shard_size_mb, ...).
    """
    if not 1 <= num_classes <= 255:
        raise ValueError(f"--num-classes must be within 1..255, got {num_classes}")

    def make(item: tuple[str, Path, Path]) -> dict[str, Any]:
        stem, image_path, label_path = item
        jpg, shape = read_image(image_path)
        seg = read_label_png(label_path, shape)
        check_class_ids(seg, num_classes, label_path)
        return {"__key__": sample_key(stem), "jpg": jpg, "seg.png": encode_png(seg)}

    items = list(_paired(images, labels))
    return write_shards(items, make, out, "seg -> shards", **shard_options)


def shard_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`write_shards` keyword arguments from parsed shard arguments."""
    return {
        "skip_bad": args.skip_bad,
        "shard_size_mb": args.shard_size_mb,
        "max_count": args.max_count,
        "prefix": args.prefix,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }


def run(args: argparse.Namespace) -> int:
    convert_seg(args.images, args.labels, args.out, args.num_classes, **shard_options(args))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``seg``."""
    parser = subparsers.add_parser(
        "seg",
        help="segmentation shards (jpg + seg.png) from image and label-PNG folders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--labels", required=True, help="label PNG folder (same stems)")
    parser.add_argument("--num-classes", type=int, default=28, help="valid ids 0..N-1 (+255)")
    add_shard_arguments(parser)
    parser.set_defaults(func=run)
