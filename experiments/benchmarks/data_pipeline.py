"""Images/s of the pretraining data pipeline against the single-thread JPEG decode limit.

    python -m experiments.benchmarks.data_pipeline --sizes 256x192 1024x768 --images 400
    python -m experiments.benchmarks.data_pipeline --shards 'datasets/x/shard-{000000..000009}.tar'

For each image size it writes shards of generated JPEG pictures (q90, 4:2:0; a smooth random field
plus noise, which compresses like a photo: ~200 KiB at 1024x768) into a temporary folder, or reads
the ``--shards`` given, then measures

(a) ``decode``: ``simplejpeg.decode_jpeg`` of the same JPEG bytes, held in memory, in this
    process on one thread: the per-core limit of any pipeline that decodes full images;
(b) ``pipeline``: ``sapiens.data.shards.build_train_pipeline`` (pretrain reader +
    ``PretrainTransform`` random-resized-crop/flip to ``--crop``, uint8 batches collated in
    the workers; normalisation runs later, on the device) with ``num_workers`` 0, 1, 2, ...;
    images/s counted from the first batch on, so worker start-up is excluded (and printed
    separately). ``--resize-on worker device`` measures both places for the resize; with
    ``device`` the table also gives what the resize then costs per image on this CPU
    (``resize_crops`` in this process: an upper bound for an accelerator).
    ``--fast-decode`` adds rows with libjpeg-turbo's fast IDCT and upsampling.

The ratio pipeline / decode says how close the pipeline gets to one core's decode rate; values
above 1 need several processes decoding in parallel, or decoding at reduced DCT scale (crops at
least twice the output size, e.g. ``--sizes 2048x1536 --crop 1024x768``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from experiments.benchmarks._common import REPO_ROOT, markdown_table
from sapiens.data.device_resize import is_packed, resize_crops
from sapiens.data.pretrain_transform import PretrainTransform
from sapiens.data.shard_urls import expand_shards
from sapiens.data.shard_writer import brace_pattern, open_shard_writer
from sapiens.data.shards import build_train_pipeline


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768) = (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        message = f"size must look like HxW (e.g. 1024x768), got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (min 16x16)")
    return h, w


def generated_picture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB: bicubic-upscaled random colours plus N(0, 6) noise."""
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_generated_shards(
    out_dir: Path, size: tuple[int, int], count: int, per_shard: int, seed: int = 0
) -> str:
    """Write ``count`` JPEGs of ``size`` (H, W) as pretrain shards; returns the brace spec."""
    rng = np.random.default_rng(seed)
    with open_shard_writer(
        out_dir, "bench", max_count=per_shard, progress=False, verbose=False, overwrite=True
    ) as sink:
        for i in range(count):
            jpg = simplejpeg.encode_jpeg(
                generated_picture(*size, rng),
                quality=90,
                colorspace="RGB",
                colorsubsampling="420",
            )
            sink.write({"__key__": f"{i:08d}", "jpg": jpg})
    return brace_pattern(out_dir, "bench", sink.summary.shards)


def read_jpeg_bytes(spec: str, limit: int) -> list[bytes]:
    """The bytes of up to ``limit`` ``.jpg`` members of the shards in ``spec`` (local tars)."""
    blobs: list[bytes] = []
    for url in expand_shards(spec):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".jpg", ".jpeg")):
                    blobs.append(tar.extractfile(member).read())
                    if len(blobs) >= limit:
                        return blobs
    if not blobs:
        raise ValueError(f"no .jpg members in the shards {spec!r}")
    return blobs


def decode_rate(blobs: list[bytes], passes: int) -> float:
    """Best-of-``passes`` images/s of simplejpeg decoding every blob once, one thread."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for data in blobs:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
        best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def pipeline_rate(
    spec: str, crop: tuple[int, int], batch: int, batches: int, workers: int, transform: dict
) -> tuple[float, float, float]:
    """(images/s after the first batch, seconds until the first batch, device-resize ms per image
    on this CPU or NaN) of the train pipeline with ``PretrainTransform(crop, **transform)``."""
    loader = build_train_pipeline(
        spec,
        batch_size=batch,
        epoch_length=batches,
        reader="pretrain",
        sample_transform=PretrainTransform(crop, **transform),
        num_workers=workers,
        resampled=True,
        shuffle_buffer=batch,
        seed=0,
    )
    start = time.perf_counter()
    first = None
    count = 0
    packed = None
    for out in loader:
        if first is None:
            first = time.perf_counter()
            packed = out["image"] if is_packed(out["image"]) else None
        else:
            image = out["image"]
            count += len(image["shapes"]) if is_packed(image) else image.shape[0]
    end = time.perf_counter()
    resize_ms = float("nan")
    if packed is not None:
        t0 = time.perf_counter()
        resize_crops(packed)
        resize_ms = (time.perf_counter() - t0) * 1e3 / batch
    return count / (end - first), first - start, resize_ms


def pipeline_rate_isolated(
    spec: str, crop: tuple[int, int], batch: int, batches: int, workers: int, transform: dict, timeout: float
) -> tuple[float, float, float] | None:
    """:func:`pipeline_rate` in a fresh interpreter; None if it did not finish in ``timeout`` s.

    A fresh process forks its DataLoader workers before doing any other work, as a training run
    does; in one long-lived process a worker forked after earlier cv2/torch work was once seen to
    hang before producing anything, so every setting is isolated and bounded in time.
    """
    job = json.dumps([spec, list(crop), batch, batches, workers, transform])
    cmd = [sys.executable, "-m", "experiments.benchmarks.data_pipeline", "--child", job]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"pipeline measurement failed: {err.stderr[-2000:]}") from None
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.data_pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[(256, 192), (1024, 768)],
        help="generated image sizes HxW",
    )
    parser.add_argument(
        "--shards", default=None, help="measure existing pretrain shards instead of generated ones"
    )
    parser.add_argument("--images", type=int, default=400, help="images per size (generated)")
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument(
        "--crop", type=parse_size, default=None, help="PretrainTransform output HxW (default: the image size)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--batches", type=int, default=None, help="batches timed per worker setting (default: images / batch)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--resize-on",
        nargs="+",
        choices=["worker", "device"],
        default=["worker", "device"],
        help="where PretrainTransform resizes the crop (both are measured by default)",
    )
    parser.add_argument("--fast-decode", action="store_true", help="also measure fast_decode=True")
    parser.add_argument("--passes", type=int, default=2, help="decode passes (best is kept)")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline runs per setting (best is kept)")
    parser.add_argument("--keep", default=None, help="write generated shards here and keep them")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per pipeline setting")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shards is None and args.images < args.batch * 2:
        parser.error("--images must be at least 2 x --batch")
    if min(args.workers) < 0:
        parser.error("--workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and return its rows."""
    args = parse_args(argv)
    if args.child:
        spec, crop, batch, batches, workers, transform = json.loads(args.child)
        print(json.dumps(pipeline_rate(spec, tuple(crop), batch, batches, workers, transform)))
        return []
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_shards_"))
    rows: list[dict] = []
    try:
        if args.shards:
            sources = [("given", args.shards, None)]
        else:
            sources = []
            for h, w in args.sizes:
                start = time.perf_counter()
                spec = write_generated_shards(tmp / f"{h}x{w}", (h, w), args.images, args.per_shard)
                print(f"wrote {args.images} JPEGs {h}x{w} in {time.perf_counter() - start:.1f} s -> {spec}")
                sources.append((f"{h}x{w}", spec, (h, w)))
        for label, spec, size in sources:
            blobs = read_jpeg_bytes(spec, args.images)
            if size is None:
                first = simplejpeg.decode_jpeg(blobs[0], colorspace="RGB")
                size = first.shape[:2]
            crop = args.crop or tuple(size)
            decode = decode_rate(blobs, args.passes)
            kib = sum(len(b) for b in blobs) / len(blobs) / 1024
            batches = args.batches or max(2, len(blobs) // args.batch)
            settings = [
                {"resize_on": where, "fast_decode": fast}
                for where in args.resize_on
                for fast in ([False, True] if args.fast_decode else [False])
            ]
            for transform, workers in itertools.product(settings, args.workers):
                job = (spec, crop, args.batch, batches, workers, transform)
                runs = [pipeline_rate_isolated(*job, args.timeout) for _ in range(args.repeats)]
                runs = [r for r in runs if r is not None]
                res = max(runs, key=lambda r: r[0]) if runs else None  # best run: least disturbed
                rate, startup, resize_ms = res if res is not None else (float("nan"),) * 3
                name = transform["resize_on"] + (" fast" if transform["fast_decode"] else "")
                print(
                    f"{label} {name} workers={workers}: "
                    + (f"{rate:.0f} img/s" if res else f"no result in {args.timeout:.0f} s"),
                    flush=True,
                )
                rows.append(
                    {
                        "images": label,
                        "jpeg_kib": kib,
                        "crop": f"{crop[0]}x{crop[1]}",
                        "resize": name,
                        "decode": decode,
                        "workers": workers,
                        "pipeline": rate,
                        "startup_s": startup,
                        "ratio": rate / decode,
                        "device_ms": resize_ms,
                    }
                )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nbatch {args.batch}; decode = simplejpeg, 1 thread, in-process; pipeline = "
        "build_train_pipeline + PretrainTransform, images/s after the first batch\n"
    )
    table = [
        [
            r["images"],
            f"{r['jpeg_kib']:.0f}",
            r["crop"],
            r["resize"],
            f"{r['decode']:.0f}",
            r["workers"],
            f"{r['pipeline']:.0f}",
            f"{r['ratio']:.2f}",
            f"{r['startup_s']:.2f}",
            "" if r["device_ms"] != r["device_ms"] else f"{r['device_ms']:.2f}",
        ]
        for r in rows
    ]
    header = [
        "images",
        "JPEG KiB",
        "crop",
        "resize on",
        "decode img/s",
        "workers",
        "pipeline img/s",
        "pipeline/decode",
        "first batch s",
        "device resize ms/img (this CPU)",
    ]
    print(markdown_table(header, table))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
