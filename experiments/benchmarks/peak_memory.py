"""Peak memory of one fine-tuning forward + backward, with and without activation checkpointing.

    python -m experiments.benchmarks.peak_memory --configs vit_small@1024x768 sapiens_0.3b@256x192
    python -m experiments.benchmarks.peak_memory --device cuda --configs sapiens_0.3b@1024x768 ...

Each configuration (model @ HxW, batch, checkpointing on/off) runs in a fresh subprocess, which
builds the fine-tuning backbone (learned position table, no cls token; plus the pose
``HeatmapHead`` with ``--head pose``), runs one unmeasured warm-up step, frees its gradients, then
measures the memory added by one forward + backward (loss = mean square of the output; no
optimizer step), gradients included:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the step;
- CPU: the process peak RSS minus the RSS before the step. The kernel's high-water mark is reset
  just before the step (``echo 5 > /proc/self/clear_refs``, Linux) and read back as ``VmHWM``;
  where that is unavailable, ``resource.getrusage`` max RSS is used (then the model build's own
  peak may hide a smaller step peak). RSS also counts allocator slack, so treat CPU figures as
  upper bounds to within a few tens of MiB.

The measured increase is compared with the analytic figure of ``sapiens.memory_model`` (when the
module exists): activations saved for backward (at 4 bytes/value for fp32, 2 for bf16) + parameter
gradients (4 bytes each; fp32 weights). That sum is an upper bound of the step peak: backward frees
activations while it allocates gradients, so when gradients dominate (big model, few tokens) the
measured peak approaches the gradients alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from experiments.benchmarks._common import REPO_ROOT, load_backbone_shape, markdown_table

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False when not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so that RSS tracks live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(cfg: dict) -> dict:
    """One configuration, in this process: build, run forward + backward, return bytes."""
    from sapiens.models.vit import VisionTransformer

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    shape = load_backbone_shape(cfg["model"])
    backbone = VisionTransformer(
        img_size=(cfg["height"], cfg["width"]),
        patch_size=shape.get("patch_size", 16),
        embed_dim=shape["embed_dim"],
        depth=shape["depth"],
        num_heads=shape["num_heads"],
        mlp_ratio=shape.get("mlp_ratio", 4.0),
        pos_embed="learned",
        cls_token=False,
        grad_checkpointing=cfg["checkpointing"],
    )
    model = backbone
    if cfg["head"] == "pose":
        from sapiens.models.heads import HeatmapHead

        model = torch.nn.Sequential(backbone, HeatmapHead(backbone.embed_dim, cfg["keypoints"]))
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    images = torch.randn(cfg["batch"], 3, cfg["height"], cfg["width"], device=device)
    dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cfg["dtype"] == "bf16"):
            out = model(images)
        out.float().pow(2).mean().backward()

    # A first, unmeasured step loads lazily initialised code and kernels (tens of MiB of RSS
    # that are not activations); its tensors are then freed and handed back to the OS.
    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    _release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = _reset_peak_rss()
        before = _rss_bytes()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "cuda.max_memory_allocated"
    else:
        peak = _peak_rss_bytes(reset)
        method = "VmHWM after clear_refs" if reset else "getrusage max RSS"
    return {"params": params, "before": before, "peak": peak, "step_peak": peak - before, "method": method}


def analytic(cfg: dict, params: int) -> int | None:
    """Activations (``sapiens.memory_model``) + fp32 gradients, bytes; None without the module."""
    try:
        from sapiens.memory_model import VitShape, activation_bytes_per_sample
    except ImportError:
        return None
    shape = load_backbone_shape(cfg["model"])
    vit = VitShape(
        cfg["model"],
        shape["embed_dim"],
        shape["depth"],
        shape["num_heads"],
        shape.get("patch_size", 16),
        shape.get("mlp_ratio", 4.0),
    )
    per_sample = activation_bytes_per_sample(
        vit,
        cfg["height"],
        cfg["width"],
        cfg["checkpointing"],
        bytes_per_value=2 if cfg["dtype"] == "bf16" else 4,
    )
    return cfg["batch"] * per_sample + 4 * params


def run_child(cfg: dict, timeout: float) -> dict:
    """Measure ``cfg`` in a fresh interpreter (so peaks of earlier configs do not leak in)."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.peak_memory", "--child", json.dumps(cfg)]
    # A fixed mmap threshold makes glibc map every large tensor separately and unmap it on free,
    # so RSS follows the live tensors instead of a heap that only grows.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": " / ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_config(text: str) -> tuple[str, int, int]:
    """``"sapiens_0.3b@256x192"`` -> ("sapiens_0.3b", 256, 192)."""
    try:
        model, size = text.split("@")
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"config must look like MODEL@HxW (e.g. sapiens_0.3b@256x192), got {text!r}"
        ) from None
    return model, h, w


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every configuration with and without checkpointing; print and return the rows."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.peak_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        type=parse_config,
        nargs="+",
        default=[("vit_small", 1024, 768), ("sapiens_0.3b", 256, 192)],
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--head",
        choices=["none", "pose"],
        default="none",
        help="add the pose HeatmapHead (not in the analytic figure)",
    )
    parser.add_argument("--keypoints", type=int, default=308)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return []
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    for model, h, w in args.configs:
        load_backbone_shape(model)  # fail early on a typo
        if h % 16 or w % 16:
            parser.error(f"{model}@{h}x{w}: sizes must be multiples of 16")
    rows = []
    for model, h, w in args.configs:
        for ckpt in (False, True):
            cfg = {
                "model": model,
                "height": h,
                "width": w,
                "batch": args.batch,
                "checkpointing": ckpt,
                "device": args.device,
                "dtype": args.dtype,
                "head": args.head,
                "keypoints": args.keypoints,
            }
            res = run_child(cfg, args.timeout)
            row = {**cfg, **res}
            if "error" not in res:
                row["analytic"] = analytic(cfg, res["params"])
            rows.append(row)
            shown = res.get("error") or f"{res['step_peak'] / MIB:.0f} MiB"
            print(f"{model}@{h}x{w} batch {args.batch} checkpointing={ckpt}: {shown}", flush=True)

    def mib(v: int | None) -> str:
        return "n/a" if v is None else f"{v / MIB:.0f}"

    table = []
    for r in rows:
        if "error" in r:
            table.append(
                [
                    r["model"],
                    f"{r['height']}x{r['width']}",
                    r["batch"],
                    r["checkpointing"],
                    "error",
                    "",
                    "",
                    "",
                    r["error"],
                ]
            )
            continue
        table.append(
            [
                r["model"],
                f"{r['height']}x{r['width']}",
                r["batch"],
                r["checkpointing"],
                f"{r['params'] / 1e6:.1f}",
                mib(r["before"]),
                mib(r["step_peak"]),
                mib(r["analytic"]),
                r["method"],
            ]
        )
    print(
        f"\ndevice {args.device}, {args.dtype}, head {args.head}; 'step peak' = memory added "
        "by forward + backward; 'analytic' = sapiens.memory_model activations + fp32 grads\n"
    )
    print(
        markdown_table(
            [
                "model",
                "image",
                "batch",
                "checkpointing",
                "params M",
                "before MiB",
                "step peak MiB",
                "analytic MiB",
                "measured by",
            ],
            table,
        )
    )
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
