"""Pieces shared by the benchmark scripts: model shapes from ``conf/model``, device peaks, timing.

Benchmarks run as ``python -m experiments.benchmarks.<name>`` or ``python experiments/benchmarks/<name>.py``
from the repository root; both resolve ``conf/`` relative to this file, not the working directory.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONF_DIR = REPO_ROOT / "conf" / "model"

# Published dense (no sparsity) tensor-core peaks, FLOP/s, matched as whole words of
# torch.cuda.get_device_name(), first match wins. fp32 = plain CUDA-core fp32 (with
# float32_matmul_precision=high, fp32 matmuls run as TF32, which this table does not count).
# The H100 PCIe card is lower than the SXM one; "H100" alone is the SXM (HBM3) figure.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp32": 80e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "GH200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H800": {"bf16": 989e12, "fp32": 67e12},
    "H20": {"bf16": 148e12, "fp32": 44e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
}


def available_models() -> list[str]:
    """Names of the model configs in ``conf/model`` (file stems)."""
    return sorted(p.stem for p in MODEL_CONF_DIR.glob("*.yaml"))


def load_backbone_shape(name: str) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` -> its ``backbone`` dict (embed_dim, depth, num_heads, ...).

    Raises:
        FileNotFoundError: no such model config (the message lists the available ones).
        ValueError: the file has no ``backbone`` mapping with ``embed_dim``/``depth``/``num_heads``.
    """
    path = MODEL_CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found; choose one of {available_models()}")
    data = yaml.safe_load(path.read_text()) or {}
    backbone = data.get("backbone")
    need = ("embed_dim", "depth", "num_heads")
    if not isinstance(backbone, dict) or any(k not in backbone for k in need):
        raise ValueError(f"{path}: expected a 'backbone' mapping with keys {need}")
    return dict(backbone)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s of this CPU with all intra-op threads: best of ``repeats``
    ``torch.mm`` calls on (size, size) matrices, counted as 2 * size**3 FLOPs each."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool start, page faults of the output
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s to compare against, and where it comes from.

    CPU: measured fp32 matmul peak (:func:`cpu_matmul_peak`; used for bf16 too, which is far
    slower on most CPUs). CUDA: the published dense peak of a known card, else ``None``.
    """
    if device.type == "cpu":
        peak = cpu_matmul_peak()
        threads = torch.get_num_threads()
        return peak, f"measured fp32 torch.mm peak, best of runs, {threads} threads"
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if re.search(rf"\b{re.escape(key)}\b", name):  # whole words: "A10" is not "A100" or "A10G"
            return peaks[dtype], f"published dense {dtype} peak of {key} ({name})"
    return None, f"unknown GPU {name!r}: no published peak on file"


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` averaged over ``steps`` calls after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def si(value: float, unit: str = "") -> str:
    """Human-readable engineering notation: ``si(3.2e12, 'FLOP/s') == '3.20 TFLOP/s'``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (every cell through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
