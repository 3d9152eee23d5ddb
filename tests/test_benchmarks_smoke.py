"""Each benchmark script runs end to end with tiny arguments and prints its figures.

No timing is asserted: only that the figures are printed and are sane numbers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def run_benchmark(name: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.benchmarks.{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*" + NUMBER, text)
    assert match, f"{label!r} not printed in:\n{text}"
    return float(match.group(1))


def markdown_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


@pytest.mark.parametrize("task", ["pretrain", "finetune", "distill"])
def test_pretrain_throughput(task: str, tmp_path) -> None:
    extra = {"pretrain": ["--reference", "--rounds", "1"], "distill": ["--rounds", "1"]}.get(task, [])
    out = run_benchmark(
        "pretrain_throughput",
        "--task",
        task,
        "--model",
        "vit_tiny",
        "--height",
        "64",
        "--width",
        "48",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--decoder-dim",
        "32",
        "--decoder-depth",
        "1",
        "--decoder-heads",
        "4",
        "--keypoints",
        "17",
        "--head-channels",
        "16",
        "--prototypes",
        "64",
        "--head-hidden",
        "32",
        "--head-bottleneck",
        "16",
        "--local-crops",
        "1",
        "--local-size",
        "32",
        "--flop-check",
        "--profile",
        "1",
        "--json",
        str(tmp_path / "figures.json"),
        *extra,
    )
    assert f"task: {task}" in out and "AdamW: fused" in out
    if task == "distill":  # MAE timed at the same shapes in alternating rounds, then the ratios
        assert number_after("distill / MAE at the same shapes:", out) > 0
        assert number_after("process CPU time per step:", out) > 0
    assert number_after("images/s:", out) > 0
    assert number_after("fraction of peak:", out) > 0
    assert "FLOP/s" in out and "measured fp32 torch.mm peak" in out
    assert number_after("counted / analytic =", out) > 0
    assert "profile of 1 steps" in out and "matmul / conv" in out
    if task == "pretrain":
        assert number_after("ours at", out) > 0  # the plain reference MAE ran beside ours
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["images_per_s"] > 0 and figures["task"] == task


def test_pretrain_throughput_rejects_unknown_model() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.pretrain_throughput", "--model", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "conf/model/nope.yaml" in proc.stderr and "vit_tiny" in proc.stderr


def test_cpu_attention() -> None:
    out = run_benchmark(
        "cpu_attention", "--tokens", "48", "512", "--height", "32", "--width", "24", "--batch", "2",
        "--repeats", "1", "--rounds", "1",
    )  # fmt: skip
    rows = markdown_rows(out)
    # Kernel rows: dtype, tokens, batch, fused ms, written-out ms, ratio; then the model rows.
    kernels = [r for r in rows if r[0] in ("bfloat16", "float32")]
    assert [(r[0], r[1]) for r in kernels] == [
        ("bfloat16", "48"), ("bfloat16", "512"), ("float32", "48"), ("float32", "512"),
    ]  # fmt: skip
    for row in kernels:
        fused, written, ratio = float(row[3]), float(row[4]), float(row[5])
        # Sub-millisecond at these sizes: the printed (rounded) times cannot reproduce the ratio.
        assert fused >= 0 and written >= 0 and ratio > 0
    steps = {r[0]: r for r in rows if r[0] in ("MAE pretraining", "pose fine-tune")}
    assert len(steps) == 2 and all(float(r[1]) > 0 and float(r[2]) > 0 for r in steps.values())


def test_data_pipeline() -> None:
    out = run_benchmark(
        "data_pipeline",
        "--sizes",
        "64x48",
        "--images",
        "24",
        "--batch",
        "4",
        "--workers",
        "0",
        "1",
        "--per-shard",
        "12",
    )
    rows = markdown_rows(out)
    # one row per (resize place, worker setting); columns: images, KiB, crop, resize on, decode,
    # workers, pipeline, ratio, first batch, device resize ms
    expected = [("worker", "0"), ("worker", "1"), ("device", "0"), ("device", "1")]
    assert [(r[3], r[5]) for r in rows] == expected
    for row in rows:
        decode, pipeline, ratio = float(row[4]), float(row[6]), float(row[7])
        assert decode > 0 and pipeline > 0
        assert ratio == pytest.approx(pipeline / decode, rel=0.05, abs=0.01)
        assert (row[9] != "" and float(row[9]) > 0) == (row[3] == "device")  # device resize cost


def test_keypoint_eval() -> None:
    out = run_benchmark("keypoint_eval", "--images", "40", "--sets", "goliath308", "coco17")
    rows = {r[0]: r for r in markdown_rows(out)}
    assert rows["goliath308"][1] == "308" and rows["coco17"][1] == "17"
    for row in rows.values():
        assert float(row[5]) > 0 and float(row[7]) > 0  # KeypointAP compute and COCOeval seconds
        assert float(row[10]) <= 1e-6  # the same ten stats as COCOeval
        assert 0 < float(row[12]) <= 1  # AP of noisy predictions: real work, not degenerate


def test_peak_memory() -> None:
    out = run_benchmark("peak_memory", "--configs", "vit_tiny@64x48", "--batch", "1")
    rows = markdown_rows(out)
    assert [r[3] for r in rows] == ["False", "True"]
    for row in rows:
        assert row[4] != "error", row
        assert float(row[6]) >= 0  # step peak MiB


def test_predict_throughput() -> None:
    out = run_benchmark(
        "predict_throughput",
        "--height",
        "64",
        "--width",
        "48",
        "--images",
        "3",
        "--batch",
        "2",
        "--head-channels",
        "16",
        "--tasks",
        "pose",
        "seg",
    )
    rows = {r[0]: r for r in markdown_rows(out)}
    assert sorted(rows) == ["pose", "seg"]
    for row in rows.values():
        images_per_s, stages = float(row[1]), [float(v) for v in row[2:7]]
        assert images_per_s > 0 and stages[2] > 0 and all(v >= 0 for v in stages)  # model time measured
        assert float(row[7]) == pytest.approx(sum(stages) - stages[2], abs=0.2)  # non-model = the rest


def test_resume_choice() -> None:
    out = run_benchmark("resume_choice", "--gb", "0.01")
    assert number_after("checkpoint:", out) > 0
    rows = dict((r[0], float(r[1])) for r in markdown_rows(out))
    assert set(rows) == {"choose (find_resume_checkpoint)", "full torch.load"}
    assert all(v > 0 for v in rows.values())


def test_gpu_figures_plumbing_on_cpu(tmp_path) -> None:
    """The GPU table script end to end on CPU (tiny model; aot_eager so that compiling takes seconds)."""
    out = run_benchmark(
        "gpu_figures",
        "--smoke",
        "--models",
        "vit_tiny",
        "--compile-backend",
        "aot_eager",
        "--profile-steps",
        "1",
        "--out",
        str(tmp_path),
        timeout=600,
    )
    rows = markdown_rows(out)
    assert [(r[1], r[4]) for r in rows] == [
        ("MAE", "off"),
        ("MAE", "on"),
        ("pose-308 fine-tune", "off"),
        ("pose-308 fine-tune", "on"),
    ]
    for row in rows:
        assert float(row[5]) > 0 and float(row[7]) > 0  # images/s, MFU %
        assert (row[10] != "") == (row[4] == "on")  # compiled rows compare with the eager one
    report = (tmp_path / "gpu_figures.md").read_text()
    assert report.count("profile of 1 steps") == 4 and "matmul / conv" in report
