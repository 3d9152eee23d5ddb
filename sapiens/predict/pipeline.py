"""One ``predict`` run: source -> decoded frames -> :class:`Predictor` in batches -> output files.

Still images are batched together; a video's frames are batched within the video, with one
:class:`PoseTracker` (track ids, previous-frame boxes, smoothing) and one depth colour range per video.
Unreadable images and frames are skipped, counted and listed at the end (and in ``meta.json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sapiens.predict.outputs import OutputWriter, next_run_dir
from sapiens.predict.predictor import STAGES, Predictor
from sapiens.predict.results import Prediction
from sapiens.predict.sources import Frame, count_frames, iter_frames, resolve_source
from sapiens.predict.tracking import PoseTracker

log = logging.getLogger(__name__)

OVERRIDE_KEYS = ("keypoint_set", "class_list", "patch_padding", "image_size", "num_heads")


def video_depth_range(prediction: Prediction) -> tuple[float, float] | None:
    """A colour range for a whole video from its first frame: the 2nd-98th percentile of the foreground
    depth (the relative depth, else the pointmap's Z), widened by a tenth on each side (so that later
    frames rarely clip)."""
    depth = prediction.depth or prediction.pointmap
    if depth is None:
        return None
    values = depth.depth[depth.mask] if depth.mask is not None else depth.depth.ravel()
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2, 98])
    pad = 0.1 * max(float(hi - lo), 1e-6)
    return float(lo - pad), float(hi + pad)


class _Stream:
    """Per-video state: tracker and depth range."""

    def __init__(self, name: str | None, cfg: Mapping):
        self.name = name
        smoothing = dict(cfg.get("smoothing_params") or {}) if cfg.get("smoothing") else None
        self.tracker = PoseTracker(cfg.get("kpt_thr", 0.3), smoothing) if name is not None else None
        spec = cfg.get("depth_range", "auto")
        self.fixed = tuple(float(v) for v in spec) if isinstance(spec, list | tuple) else None
        self.per_video = spec == "auto" and name is not None
        if not (self.fixed or spec in ("auto", "frame")):
            raise ValueError(f"depth_range={spec}: expected auto, frame or [lo, hi]")

    def depth_range(self, prediction: Prediction) -> tuple[float, float] | None:
        if self.fixed is None and self.per_video:
            self.fixed = video_depth_range(prediction)
        return self.fixed


def build_predictor(cfg: Mapping) -> Predictor:
    """The :class:`Predictor` of a predict config."""
    checkpoint = cfg["checkpoint"]
    return Predictor(
        list(checkpoint) if isinstance(checkpoint, list | tuple) else checkpoint,
        task=list(cfg["task"]) if isinstance(cfg.get("task"), list | tuple) else cfg.get("task"),
        device=cfg.get("device", "auto"),
        precision=cfg.get("precision", "fp32"),
        batch_size=int(cfg.get("batch_size", 8)),
        compile=bool(cfg.get("compile", False)),
        flip_test=bool(cfg.get("flip_test", True)),
        boxes=str(cfg.get("boxes", "auto")),
        box_score_thr=float(cfg.get("box_score_thr", 0.3)),
        kpt_thr=float(cfg.get("kpt_thr", 0.3)),
        overrides={k: cfg.get(k) for k in OVERRIDE_KEYS if cfg.get(k) is not None},
    )


def run_predict(cfg: Mapping[str, Any]) -> dict:
    """Run a predict config (the keys of ``sapiens/predict/conf/predict.yaml``); returns ``meta.json``'s
    content (counts, timings, output folder).

    Raises:
        ValueError / FileNotFoundError: bad source, checkpoint, task or option (one line, naming it);
            also when not one image of the source could be read.
    """
    started = time.perf_counter()
    entries = resolve_source(cfg["source"])
    predictor = build_predictor(cfg)
    out_dir = Path(cfg["output_dir"]) if cfg.get("output_dir") else next_run_dir()
    writer = OutputWriter(
        out_dir,
        predictor,
        layout=cfg.get("layout", "side_by_side"),
        save_overlays=bool(cfg.get("save_overlays", True)),
        save_raw=bool(cfg.get("save_raw", True)),
        save_json=bool(cfg.get("save_json", True)),
        jpeg_quality=int(cfg.get("jpeg_quality", 90)),
        video_codec=str(cfg.get("video_codec", "auto")),
        vid_stride=int(cfg.get("vid_stride", 1)),
    )
    for name, runner in predictor.runners.items():
        log.info("%s model: %s (%s)", name, runner.spec.summary(), runner.kind)
    timer = predictor.timer
    batch: list[Frame] = []
    stream = _Stream(None, cfg)
    stride = int(cfg.get("vid_stride", 1))
    total = count_frames(entries, stride) if cfg.get("progress", True) else None
    bar = tqdm(
        total=total, desc="predict", unit="img", disable=not cfg.get("progress", True), dynamic_ncols=True
    )

    def flush() -> None:
        if not batch:
            return
        predictions = predictor.predict(
            [f.image for f in batch],
            image_ids=[f.image_id for f in batch],
            tracker=stream.tracker,
            times=[f.time for f in batch],
        )
        with timer("write"):
            for frame, prediction in zip(batch, predictions, strict=True):
                writer.write(frame, prediction, stream.depth_range(prediction))
        bar.update(len(batch))
        batch.clear()

    for frame in iter_frames(entries, int(cfg.get("num_workers", 2)), stride):
        timer.seconds["decode"] += frame.seconds
        name = frame.name if frame.video is not None else None
        if name != stream.name:
            flush()
            stream = _Stream(name, cfg)
        if frame.image is None:
            writer.skip(frame)
            bar.update(1)
            continue
        batch.append(frame)
        if len(batch) >= predictor.batch_size:
            flush()
    flush()
    bar.close()
    total = time.perf_counter() - started
    if writer.written == 0:
        reasons = "; ".join(writer.skipped[:3]) or "no images"
        raise ValueError(f"source {cfg['source']}: not one image could be read ({reasons})")
    seconds = {stage: round(timer.seconds.get(stage, 0.0), 4) for stage in STAGES}
    meta = {
        "source": cfg["source"] if isinstance(cfg["source"], str) else list(cfg["source"]),
        **predictor.describe(),
        "kpt_thr": predictor.kpt_thr,
        "layout": writer.layout,
        "seconds_total": round(total, 3),
        "seconds_per_stage": seconds,
        "ms_per_image": {k: round(1000 * v / writer.written, 3) for k, v in seconds.items()},
        "images_per_second": round(writer.written / total, 3),
    }
    meta = writer.close(meta)
    log.info(
        "%d images in %.1f s (%.2f img/s) -> %s; per image: %s ms",
        writer.written,
        total,
        writer.written / total,
        out_dir,
        ", ".join(f"{k} {v:.1f}" for k, v in meta["ms_per_image"].items()),
    )
    if writer.skipped:
        log.warning(
            "%d unreadable inputs skipped, e.g. %s (all in %s)",
            len(writer.skipped),
            writer.skipped[0],
            out_dir / "meta.json",
        )
    return {**meta, "skipped_inputs": writer.skipped}
