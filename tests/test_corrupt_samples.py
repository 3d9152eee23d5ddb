"""Corrupt samples: any decode failure is skipped and counted (zero-byte images included), named with
its shard; converters report or skip them; all-bad data fails on a count or a time budget and a run
spinning on it still stops on SIGTERM."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from data.make_shards import main as make_shards_main
from sapiens.data.pretrain_transform import PretrainTransform
from sapiens.data.shard_writer import open_shard_writer
from sapiens.data.shards import build_eval_pipeline, build_train_pipeline
from sapiens.data.skips import UnusableDataError
from tests.conftest import ROOT, TINY
from tests.test_converters_labels import raw  # noqa: F401  (fixture: a tiny COCO-style dataset)
from tests.test_shards import noise_jpeg


def header_bomb_jpeg(side: int = 30000) -> bytes:
    """A 16x16 JPEG whose header claims ``side`` x ``side`` pixels: decoding fails, slowly (~1 s)."""
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def write_shard(out: Path, images: list[bytes], prefix: str = "shard") -> str:
    with open_shard_writer(out, prefix=prefix, progress=False, verbose=False) as sink:
        for i, jpg in enumerate(images):
            sink.write({"__key__": f"s{i:05d}", "jpg": jpg})
    return sink.summary.paths[0]


@pytest.mark.parametrize("resize_on", ["worker", "device"])
@pytest.mark.parametrize("workers", [0, 1])
def test_zero_byte_image_is_skipped_and_counted(tmp_path, workers, resize_on):
    rng = np.random.default_rng(0)
    images = [noise_jpeg(rng) for _ in range(6)]
    images[2] = b""  # a zero-byte tar member
    shard = write_shard(tmp_path, images)
    transform = PretrainTransform((16, 16), resize_on=resize_on, seed=0)
    batches = list(build_eval_pipeline(shard, 4, sample_transform=transform, num_workers=workers))
    kept = sum(len(b["image"]["shapes"]) if resize_on == "device" else len(b["image"]) for b in batches)
    assert kept == 5
    assert sum(int(b["num_skipped"]) for b in batches) == 1


def test_skip_warning_of_the_pretraining_transform_names_the_shard(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images = [noise_jpeg(rng), b"\xff\xd8\xffbroken", noise_jpeg(rng), header_bomb_jpeg()]
    shard = write_shard(tmp_path, images, "named")
    transform = PretrainTransform((16, 16), seed=0)
    with caplog.at_level(logging.WARNING):
        list(build_eval_pipeline(shard, 4, sample_transform=transform, num_workers=0))
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping:")]
    assert len(skips) == 2
    assert all(f"in {shard}" in message for message in skips), skips
    assert "'s00001'" in skips[0] and "'s00003'" in skips[1]


def test_all_bad_slow_data_gives_up_on_the_time_budget(tmp_path):
    """Header bombs take about a second each to reject: 10,000 of them would take hours."""
    shard = write_shard(tmp_path, [header_bomb_jpeg()] * 3)
    transform = PretrainTransform((16, 16), seed=0)
    loader = build_train_pipeline(
        shard,
        2,
        3,
        sample_transform=transform,
        num_workers=0,
        max_consecutive_skips=10**9,
        max_skip_seconds=1.5,
    )
    with pytest.raises(UnusableDataError, match=r"without one good sample \(data.max_skip_seconds=1.5\)"):
        list(loader)


# -- converters -----------------------------------------------------------------------------
def test_images_converter_reports_or_skips_a_zero_byte_image(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(noise_jpeg(rng))
    (src / "1.jpg").write_bytes(b"")
    args = ["images", "--src", str(src), "--no-progress"]
    assert make_shards_main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src / "1.jpg") in err[0] and "0 bytes" in err[0], err
    assert make_shards_main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().out


def test_coco_converter_reports_or_skips_a_zero_byte_image(raw, tmp_path, capsys):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    for path in (raw / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "000003.jpg").write_bytes(b"")
    args = ["coco", "--ann", str(raw / "annotations" / "person_keypoints.json"), "--images", str(images)]
    args += ["--no-progress"]
    assert make_shards_main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000003.jpg" in err[0], err
    assert make_shards_main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    assert "skipped 1 bad item(s)" in capsys.readouterr().out


# -- a run spinning on bad data stops on SIGTERM ----------------------------------------------
@pytest.mark.slow
def test_sigterm_stops_a_run_that_only_skips(tmp_path):
    """Every sample is a header bomb; the stream never reaches a step boundary, where Lightning
    looks at SIGTERM. The run must still stop within a few samples, with a one-line message."""
    root = tmp_path / "data"
    write_shard(root / "shards" / "pretrain" / "train", [header_bomb_jpeg()] * 4)
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"data.root={root}", "data.val_shards=null"]
    cmd += [f"paths.output_dir={tmp_path / 'runs'}", "logger=csv", "trainer.max_steps=5"]
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in proc.stdout:  # wait until the pipeline is skipping
            lines.append(line)
            if "skipping:" in line:
                break
        assert proc.poll() is None, "".join(lines)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    waited = time.monotonic() - sent
    lines += out.splitlines(keepends=True)
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines[-30:])
    assert errors == [errors[0]] and "stopped by SIGTERM" in errors[0], "".join(lines[-30:])
    assert "Traceback" not in "".join(lines)
    print(f"stopped {waited:.1f} s after SIGTERM")
