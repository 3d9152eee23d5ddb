"""Video in and out: frames with their times (PyAV when installed, else OpenCV), and a writer that
encodes H.264 through PyAV or falls back to OpenCV's mp4v.

PyAV decodes packet by packet, so a corrupt packet costs one frame (yielded as None and counted by
the caller), not the rest of the video; its frame times come from the stream's timestamps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


class VideoError(ValueError):
    """A video that cannot be opened or written (one line, naming the file)."""


def _pyav():
    try:
        import av
    except ImportError:
        return None
    return av


@dataclass
class VideoInfo:
    """What is known about a video before decoding: ``fps``, ``frame_count`` (0 when the container does
    not say), ``width``, ``height`` and the ``backend`` that reads it (``pyav`` or ``opencv``)."""

    path: str
    fps: float
    frame_count: int
    width: int
    height: int
    backend: str


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` once to read its frame rate, size and length; :class:`VideoError` if it cannot."""
    av = _pyav()
    if av is not None:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoError(f"{path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or 0
                return VideoInfo(
                    str(path), float(rate), int(stream.frames or 0), stream.width, stream.height, "pyav"
                )
        except av.FFmpegError as err:
            raise VideoError(f"cannot read video {path}: {err}") from None
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(
                f"cannot read video {path}: OpenCV cannot open it (install PyAV: pip install av)"
            )
        return VideoInfo(
            str(path),
            float(cap.get(cv2.CAP_PROP_FPS) or 0),
            int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "opencv",
        )
    finally:
        cap.release()


def read_frames(info: VideoInfo) -> Iterator[tuple[int, float, np.ndarray | None]]:
    """(index, time in seconds, RGB uint8 (H, W, 3) or None when that frame does not decode) per frame."""
    if info.backend == "pyav":
        yield from _read_pyav(info)
    else:
        yield from _read_opencv(info)


def _read_pyav(info: VideoInfo) -> Iterator[tuple[int, float, np.ndarray | None]]:
    av = _pyav()
    index = 0
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as err:
                log.warning("%s: frame %d does not decode (%s)", info.path, index, err)
                yield index, index / max(info.fps, 1e-9), None
                index += 1
                continue
            for frame in frames:
                time = frame.time if frame.time is not None else index / max(info.fps, 1e-9)
                yield index, float(time), frame.to_ndarray(format="rgb24")
                index += 1


def _read_opencv(info: VideoInfo) -> Iterator[tuple[int, float, np.ndarray | None]]:
    cap = cv2.VideoCapture(info.path)
    index = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield index, index / max(info.fps, 1e-9), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()


class VideoWriter:
    """Encode RGB frames into ``path`` at ``fps``.

    Args:
        codec: ``auto`` (H.264 through PyAV when installed, else OpenCV ``mp4v``), ``h264``, an FFmpeg
            encoder name PyAV knows (``libx265``, ``mpeg4``...), or a four-letter OpenCV code (``mp4v``).
        quality: x264 CRF (lower is better; 23 is FFmpeg's default).

    Raises:
        VideoError: the codec is not available (naming the file and what to install).
    """

    def __init__(self, path: str | Path, fps: float, codec: str = "auto", quality: int = 20):
        self.path, self.fps, self.quality = Path(path), float(fps) if fps > 0 else 30.0, quality
        av = _pyav()
        if codec == "auto":
            codec = "libx264" if av is not None and "libx264" in av.codecs_available else "mp4v"
        elif codec == "h264":
            if av is None:
                raise VideoError(
                    f"cannot write {self.path}: H.264 needs PyAV (pip install av), or use codec=mp4v"
                )
            codec = "libx264"
        self.use_pyav = not (len(codec) == 4 and codec.isalnum() and codec not in ("h264", "hevc"))
        if self.use_pyav and (av is None or codec not in av.codecs_available):
            raise VideoError(
                f"cannot write {self.path}: no '{codec}' encoder "
                f"({'PyAV is not installed' if av is None else 'PyAV has none'})"
            )
        self.codec = codec
        self._container = self._stream = self._cv = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (height, width)
        if self.use_pyav:
            av = _pyav()
            self._container = av.open(str(self.path), "w")
            self._stream = self._container.add_stream(
                self.codec, rate=Fraction(self.fps).limit_denominator(1001)
            )
            # 4:2:0 chroma needs even sizes: frames are padded by one pixel where needed.
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                self._stream.options = {"crf": str(self.quality)}
        else:
            fourcc = cv2.VideoWriter_fourcc(*self.codec)
            self._cv = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            if not self._cv.isOpened():
                raise VideoError(f"cannot write {self.path}: OpenCV has no '{self.codec}' encoder here")

    def write(self, rgb: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame; every frame must have the first one's size."""
        if self.size is None:
            self._open(*rgb.shape[:2])
        if rgb.shape[:2] != self.size:
            rgb = cv2.resize(rgb, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA)
        if self.use_pyav:
            av = _pyav()
            pad_h, pad_w = self._stream.height - rgb.shape[0], self._stream.width - rgb.shape[1]
            if pad_h or pad_w:
                rgb = cv2.copyMakeBorder(rgb, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        else:
            self._cv.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        if self._cv is not None:
            self._cv.release()
        self._container = self._stream = self._cv = None
