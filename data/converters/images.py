"""``images`` subcommand: pretraining shards (``jpg`` only) from a folder or a list of images.

    python -m data.make_shards images --src DIR_OR_FILELIST --out OUT [--shard-size-mb 256]
        [--max-count N] [--skip-bad] [--no-verify]

JPEG files are stored byte-for-byte (after a decode check unless ``--no-verify``); PNG / WebP
(and anything else cv2 can read) are decoded and re-encoded as JPEG. Sample keys are the
zero-padded index of the image in sorted order (folders) or list order (file lists).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg

from sapiens.data.readers import decode_image_bytes
from sapiens.data.shard_writer import ShardWriteSummary, open_shard_writer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
JPEG_MAGIC = b"\xff\xd8\xff"
CHUNK = 256  # images decoded concurrently before writing; bounds memory use


def list_images(src: str | Path) -> list[Path]:
    """Images under a folder (recursive, jpg/jpeg/png/webp, sorted) or listed in a text file
    (one path per line, ``#`` comments, relative paths relative to the list file's folder)."""
    src = Path(src)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"{src}: no .jpg/.jpeg/.png/.webp images found (searched recursively)")
        return paths
    if src.is_file():
        paths = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                paths.append(path if path.is_absolute() else src.parent / path)
        if not paths:
            raise ValueError(f"{src}: the image list is empty")
        return paths
    raise FileNotFoundError(f"--src {src}: no such folder or image-list file")


def load_as_jpeg(path: Path, verify: bool = True, quality: int = 95) -> bytes:
    """Return JPEG bytes for ``path``: JPEG files as stored (decoded first when ``verify``),
    other formats decoded and re-encoded at ``quality``.

    Raises:
        ValueError: naming the file, when it cannot be read or decoded.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    is_jpeg = data[:3] == JPEG_MAGIC
    if is_jpeg and not verify:
        return data
    try:
        rgb = decode_image_bytes(data)
    except ValueError as err:
        raise ValueError(f"{path}: not a decodable image ({err})") from None
    if is_jpeg:
        return data
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


def _converted(
    paths: list[Path], verify: bool, quality: int, workers: int
) -> Iterator[tuple[Path, bytes | ValueError]]:
    def work(path: Path) -> bytes | ValueError:
        try:
            return load_as_jpeg(path, verify, quality)
        except ValueError as err:
            return err

    # simplejpeg and cv2 release the GIL, so threads decode in parallel; chunks keep order
    # and bound how many images are held in memory.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start : start + CHUNK]
            yield from zip(chunk, pool.map(work, chunk), strict=True)


def convert_images(
    src: str | Path,
    out: str | Path,
    shard_size_mb: float = 256.0,
    max_count: int = 100_000,
    skip_bad: bool = False,
    verify: bool = True,
    quality: int = 95,
    prefix: str = "shard",
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardWriteSummary:
    """Write pretraining shards from images; see the module docstring.

    Raises:
        ValueError: a bad image (naming it) unless ``skip_bad``, where it is counted instead.
    """
    paths = list_images(src)
    width = max(9, len(str(len(paths))))
    with open_shard_writer(
        out,
        prefix=prefix,
        max_size_mb=shard_size_mb,
        max_count=max_count,
        total=len(paths),
        desc="images -> shards",
        progress=progress,
        overwrite=overwrite,
    ) as sink:
        for index, (_, result) in enumerate(_converted(paths, verify, quality, workers)):
            if isinstance(result, ValueError):
                if not skip_bad:
                    raise ValueError(f"{result}; remove or fix it, or pass --skip-bad")
                sink.skip(str(result))
                continue
            sink.write({"__key__": f"{index:0{width}d}", "jpg": result})
    if sink.summary.samples == 0:
        raise ValueError(f"{src}: no image could be converted ({sink.summary.skipped} skipped)")
    return sink.summary


def run(args: argparse.Namespace) -> int:
    convert_images(
        args.src,
        args.out,
        shard_size_mb=args.shard_size_mb,
        max_count=args.max_count,
        skip_bad=args.skip_bad,
        verify=not args.no_verify,
        quality=args.quality,
        prefix=args.prefix,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``images``."""
    parser = subparsers.add_parser(
        "images",
        help="pretraining shards (jpg) from a folder or an image list",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="image folder (recursive) or text file list")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="roll-over size")
    parser.add_argument("--max-count", type=int, default=100_000, help="max samples per shard")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad images")
    parser.add_argument("--no-verify", action="store_true", help="do not decode-check JPEGs")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoding")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--workers", type=int, default=2, help="decode threads")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
