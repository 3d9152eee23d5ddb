"""What ``source=`` names -> decoded frames.

A source is an image, a folder (searched recursively for images and videos; a folder of ``.tar`` files
only is read as shards), a glob (``photos/**/*.jpg``), a ``.txt`` list of any of these, a video file, or
a WebDataset shard spec (``/shards/val-{000000..000009}.tar``, ``pipe:...``, ``https://...``).

Images are decoded by a pool of threads (the JPEG and PNG decoders release the GIL) ahead of the model;
videos and shards by one thread each. An unreadable image, frame or sample becomes a :class:`Frame`
with ``image=None`` and the reason in ``error``: the caller skips and counts it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import tarfile_samples

from sapiens.data.readers import IMAGE_EXTENSIONS as SHARD_IMAGE_KEYS
from sapiens.data.readers import decode_image_bytes, is_jpeg
from sapiens.data.shard_urls import REMOTE_PREFIXES, expand_shards
from sapiens.predict.video import VIDEO_SUFFIXES, VideoError, VideoInfo, probe_video, read_frames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm")


@dataclass
class Entry:
    """One item of a resolved source: ``kind`` is ``image``, ``video`` or ``shards``; ``name`` the output name
    (path relative to the source root, without suffix); ``image_id`` the COCO id of an image."""

    kind: str
    path: str | list[str]
    name: str
    image_id: int = 0


@dataclass
class Frame:
    """One decoded image or video frame.

    Attributes:
        name: output name (a video's frames share the video's name).
        image: (H, W, 3) uint8 RGB, or None when it could not be decoded.
        image_id: COCO image id (the file stem when all stems are numbers, a pose shard's ``image_id``,
            else the position in the source).
        error: why ``image`` is None.
        video: the video the frame belongs to (None for stills).
        index: frame index in the video; time: its time in seconds.
        seconds: time spent reading and decoding it (in whichever thread did).
    """

    name: str
    image: np.ndarray | None
    image_id: int
    error: str | None = None
    video: VideoInfo | None = None
    index: int = 0
    time: float = 0.0
    seconds: float = 0.0


def _kind(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix == ".tar":
        return "shards"
    return None


def _is_shard_spec(spec: str) -> bool:
    return (
        spec.startswith(REMOTE_PREFIXES) or bool(re.search(r"\{\d+\.\.\d+\}", spec)) or spec.endswith(".tar")
    )


def _files_of(spec: str, base: Path | None = None) -> list[str]:
    """Local files named by one spec: a file, a folder (recursive), a glob, or a .txt list."""
    path = Path(spec).expanduser()
    if base is not None and not path.is_absolute() and not path.exists():
        path = base / path
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        files = []
        for line in lines:
            if line and not line.startswith("#"):
                files += _files_of(line, path.parent)
        return files
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind(str(p)) in ("image", "video"))
        return found or sorted(str(p) for p in path.glob("*.tar"))
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    raise FileNotFoundError(f"source {spec}: no such file, folder, glob match or shard pattern")


def resolve_source(source: str | Sequence[str]) -> list[Entry]:
    """The images, videos and shard lists of ``source`` (one spec or a list), in order.

    Raises:
        FileNotFoundError: a spec names nothing; ValueError: a spec names no image, video or shard.
    """
    specs = [source] if isinstance(source, str | os.PathLike) else list(source)
    files: list[str] = []
    shard_specs: list[str] = []
    for spec in map(str, specs):
        if _is_shard_spec(spec) and not Path(spec).is_file():
            shard_specs.append(spec)
            continue
        found = _files_of(spec)
        if not found:
            raise ValueError(f"source {spec}: no images, videos or shards in it")
        files += found
    entries = [Entry("shards", expand_shards(s), Path(s).stem) for s in shard_specs]
    tars = [f for f in files if _kind(f) == "shards"]
    if tars:
        entries.append(Entry("shards", tars, "shards"))
    media = [f for f in files if _kind(f) != "shards"]
    if media:
        root = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in media]))
        stems = [Path(f).stem for f in media]
        numeric = all(s.isdigit() for s in stems)  # COCO-style names: the stem is the image id
        for i, f in enumerate(media):
            name = str(Path(f).resolve().relative_to(root).with_suffix(""))
            kind = "video" if _kind(f) == "video" else "image"
            entries.append(Entry(kind, f, name, int(stems[i]) if numeric else i + 1))
    return entries


def count_frames(entries: list[Entry], vid_stride: int = 1) -> int | None:
    """How many frames ``entries`` will give (for the progress bar); None when shards or a video that does
    not state its length make it unknown."""
    total = 0
    for entry in entries:
        if entry.kind == "image":
            total += 1
            continue
        if entry.kind == "shards":
            return None
        try:
            frames = probe_video(entry.path).frame_count
        except VideoError:
            frames = 1  # reported as one unreadable input
        if not frames:
            return None
        total += -(-frames // max(1, vid_stride))
    return total


# ---------------------------------------------------------------------- decoding
def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, upright by its EXIF orientation; ValueError if unreadable."""
    data = Path(path).read_bytes()
    image = decode_image_bytes(data)
    if is_jpeg(data) and b"Exif" in data[:65536]:
        image = _apply_exif_orientation(image, data)
    return image


def _apply_exif_orientation(image: np.ndarray, data: bytes) -> np.ndarray:
    """Rotate / mirror as the EXIF orientation tag says (phone photos); the decoders ignore it."""
    from PIL import Image

    try:
        orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        return image
    ops = {
        2: (0, True),
        3: (2, False),
        4: (2, True),
        5: (3, True),
        6: (3, False),
        7: (1, True),
        8: (1, False),
    }
    if orientation not in ops:
        return image
    turns, mirror = ops[orientation]
    image = np.rot90(image, turns)
    return np.ascontiguousarray(image[:, ::-1] if mirror else image)


def _still(entry: Entry) -> Frame:
    start = time.perf_counter()
    try:
        frame = Frame(entry.name, read_image(entry.path), entry.image_id)
    except (OSError, ValueError) as err:
        frame = Frame(entry.name, None, entry.image_id, error=f"{entry.path}: {err}")
    frame.seconds = time.perf_counter() - start
    return frame


def _video_frames(entry: Entry, vid_stride: int) -> Iterator[Frame]:
    try:
        info = probe_video(entry.path)
    except VideoError as err:
        yield Frame(entry.name, None, entry.image_id, error=str(err))
        return
    log.info(
        "%s: %.3g fps, %s frames, %dx%d (%s)",
        entry.path,
        info.fps,
        info.frame_count or "?",
        info.width,
        info.height,
        info.backend,
    )
    start = time.perf_counter()
    for index, at, image in read_frames(info):
        if index % vid_stride:
            continue
        error = None if image is not None else f"{entry.path}: frame {index} does not decode"
        yield Frame(entry.name, image, entry.image_id, error, info, index, at, time.perf_counter() - start)
        start = time.perf_counter()


def _shard_frames(entry: Entry, next_id: int) -> Iterator[Frame]:
    def on_error(err: Exception) -> bool:
        log.warning("shard read error (skipped): %s", err)
        return True

    start = time.perf_counter()
    for sample in tarfile_samples([{"url": u} for u in entry.path], handler=on_error):
        frame = _shard_frame(sample, next_id)
        next_id += 1
        frame.seconds = time.perf_counter() - start
        yield frame
        start = time.perf_counter()


def _shard_frame(sample: dict, image_id: int) -> Frame:
    """One raw shard sample -> Frame (``image_id`` from its ``json`` when it has one)."""
    key, meta = str(sample.get("__key__")), sample.get("json")
    if isinstance(meta, bytes | bytearray):
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            image_id = int(json.loads(meta).get("image_id", image_id))
    name = key.strip("/").replace("/", "_")
    data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
    if data is None:
        return Frame(name, None, image_id, error=f"{sample.get('__url__')}: sample {key} has no image")
    try:
        return Frame(name, decode_image_bytes(bytes(data)), image_id)
    except ValueError as err:
        return Frame(name, None, image_id, error=f"{sample.get('__url__')}: sample {key}: {err}")


def _stills(entries: list[Entry], workers: int) -> Iterator[Frame]:
    """Decode images in order, ``workers`` threads ahead of the consumer."""
    if workers <= 0:
        yield from map(_still, entries)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        todo = iter(entries)
        for entry in todo:
            pending.append(pool.submit(_still, entry))
            if len(pending) >= 2 * workers:
                break
        while pending:
            frame = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_still, nxt))
            yield frame


def iter_frames(entries: list[Entry], num_workers: int = 2, vid_stride: int = 1) -> Iterator[Frame]:
    """Every frame of ``entries`` in order (consecutive stills are decoded in parallel)."""
    run: list[Entry] = []
    next_id = 1 + max((e.image_id for e in entries), default=0)
    for entry in [*entries, None]:
        if entry is not None and entry.kind == "image":
            run.append(entry)
            continue
        if run:
            yield from _stills(run, num_workers)
            run = []
        if entry is None:
            break
        if entry.kind == "video":
            yield from prefetch(_video_frames(entry, max(1, vid_stride)), 8 if num_workers else 0)
        else:
            yield from prefetch(_shard_frames(entry, next_id), 8 if num_workers else 0)


def prefetch(items: Iterable, size: int) -> Iterator:
    """Run the iterator in a background thread, ``size`` items ahead (``size`` 0: in this thread)."""
    if size <= 0:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def work() -> None:
        try:
            for item in items:
                box.put(item)
        except BaseException as err:  # re-raised in the consumer
            box.put(err)
        box.put(done)

    threading.Thread(target=work, daemon=True, name="prefetch").start()
    while (item := box.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
