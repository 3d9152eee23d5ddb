"""GPU-only checks, in this order (``--sections``), until ``--budget-s`` is spent:

1. ``figures``: the issue-14 table (``gpu_figures.py``): MAE 1024x1024 and pose-308 fine-tuning
   1024x768 steps of sapiens_0.3b and sapiens_1b, compile off and on, bf16: images/s, TFLOP/s, MFU,
   peak memory, compile time, and where the time goes (profiler);
2. ``syncs``: a few training steps through the real trainer with ``torch.cuda.set_sync_debug_mode``
   (``step_syncs.py --cuda-sync-debug``): every host-device sync, by step and by source line;
3. ``zero``: DeepSpeed ZeRO-2 and ZeRO-3 through Lightning, eager and with ``compile=true``;
4. ``checks``: bf16 / fp32 MAE steps, flash attention per head size, activation-checkpointing memory,
   the random-resized-crop on the GPU.

Prints figures; on a machine without CUDA it says so and exits 0.

    python -m experiments.benchmarks.gpu_checks [--sections figures syncs zero checks] [--budget-s 780]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from experiments.benchmarks._common import load_backbone_shape
from sapiens.data.device_resize import pack_device_crops, resize_crops
from sapiens.data.pretrain_transform import PretrainTransform
from sapiens.models.heads import HeatmapHead
from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[2]


def flash_attention_eligible(head_dim: int, dtype=torch.bfloat16) -> bool:
    """True when SDPA runs with the flash kernel for this head size (2B has head_dim 60)."""
    q = torch.randn(1, 4, 256, head_dim, device="cuda", dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def timed_steps(step, steps: int) -> tuple[float, float]:
    """(seconds per step, peak GiB) over ``steps`` calls after one warm-up."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def mae_step(model_name: str, batch: int, dtype: torch.dtype):
    shape = load_backbone_shape(model_name)
    model = MaskedAutoencoder(VisionTransformer(img_size=(1024, 1024), **shape)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 1024, 1024, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss, _, _ = model(images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def finetune_step(model_name: str, batch: int, checkpointing: bool):
    shape = load_backbone_shape(model_name)
    backbone = VisionTransformer(
        img_size=(1024, 768), pos_embed="learned", cls_token=False, grad_checkpointing=checkpointing, **shape
    ).cuda()
    head = HeatmapHead(shape["embed_dim"], 308).cuda()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 1024, 768, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = head(backbone(images)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def deepspeed_run(stage: int, out: Path, compile_on: bool = False) -> str:
    """A few steps of the tiny pretraining preset through train.py with trainer=deepspeed_stage_N
    (and ``compile=true``), then a resume of the same run for two more steps."""
    name = f"zero{stage}{'_compiled' if compile_on else ''}"

    def train(max_steps: int) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "train.py",
            "experiment=pretrain_demo",
            "model=vit_tiny",
            f"trainer=deepspeed_stage_{stage}",
            "task.image_size=[64,48]",
            f"trainer.max_steps={max_steps}",
            "data.epoch_length=2",
            "logger=csv",
            f"data.root={out / 'synthhumans'}",
            f"paths.output_dir={out / 'runs'}",
            f"run_name={name}",
            "trainer.devices=1",
            "trainer.enable_progress_bar=false",
            f"compile={str(compile_on).lower()}",
        ]
        env = {**os.environ, "WANDB_MODE": "offline"}
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)

    run_dir = out / "runs" / "pretrain" / name
    proc = train(4)
    if proc.returncode != 0 or not (run_dir / "checkpoints" / "last.ckpt").is_dir():
        return f"FAILED: {proc.stderr[-800:]}"
    resumed = train(6)
    log = (run_dir / "train.rank0.log").read_text() if (run_dir / "train.rank0.log").exists() else ""
    if resumed.returncode != 0 or "restoring the training state of global step 4" not in log:
        return f"checkpoint written, resume FAILED: {resumed.stderr[-800:]}"
    compiled = [ln.split("] - ")[-1] for ln in log.splitlines() if "compile: first" in ln]
    return "ok (ZeRO checkpoint folder written and resumed)" + (f"; {compiled[-1]}" if compiled else "")


def device_resize_ms(batch: int = 32, seed: int = 0) -> float:
    """ms per image of ``resize_crops`` on the GPU: random crops of 1024x768 images to 1024x768
    (what ``PretrainTransform(resize_on="device")`` moves off the CPU workers)."""
    rng = np.random.default_rng(seed)
    transform = PretrainTransform((1024, 768), resize_on="device", seed=seed)
    image = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    crops = [transform({"image": image})["image"] for _ in range(batch)]
    packed, _ = pack_device_crops(crops)
    packed = {**packed, "packed": packed["packed"].cuda()}
    resize_crops(packed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        resize_crops(packed)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 5 / batch * 1e3


def basic_checks(args) -> None:
    """bf16 / fp32 MAE steps, flash attention per head size, the GPU crop, checkpointing memory."""
    for head_dim in (64, 80, 60):
        print(
            f"flash attention, head_dim {head_dim}: {'yes' if flash_attention_eligible(head_dim) else 'no'}"
        )
    for dtype in (torch.bfloat16, torch.float32):
        sec, gib = timed_steps(mae_step(args.model, args.batch, dtype), args.steps)
        print(
            f"MAE {args.model} 1024x1024 batch {args.batch} {str(dtype)[6:]}: {args.batch / sec:.1f} img/s, "
            f"peak {gib:.1f} GiB"
        )
    print(f"random-resized-crop on the GPU (resize_on=device), 1024x768: {device_resize_ms():.3f} ms/img")
    for ckpt in (False, True):
        sec, gib = timed_steps(finetune_step(args.model, args.batch, ckpt), args.steps)
        print(
            f"pose-308 fine-tune {args.model} 1024x768 batch {args.batch} bf16, activation checkpointing "
            f"{'on ' if ckpt else 'off'}: {args.batch / sec:.1f} img/s, peak {gib:.1f} GiB"
        )


def sync_check() -> None:
    """Real host-device syncs of a few training steps on this GPU, per step and source line."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.step_syncs", "--cuda-sync-debug", "trainer=gpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = proc.stdout[proc.stdout.find("host syncs") :] if "host syncs" in proc.stdout else ""
    print(report or f"sync check FAILED: {proc.stderr[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["figures", "syncs", "zero", "checks"])
    parser.add_argument("--budget-s", type=float, default=780, help="no new section starts after this")
    parser.add_argument("--model", default="sapiens_0.3b", help="model of the basic checks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--work-dir", default="/tmp/sapiens_gpu_checks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU checks skipped (run this on a GPU machine)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    start, out = time.perf_counter(), Path(args.work_dir)
    for section in args.sections:
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            print(f"\n== {section}: skipped (time budget spent)")
            continue
        print(f"\n== {section}", flush=True)
        if section == "figures":
            from experiments.benchmarks.gpu_figures import main as figures

            figures(["--budget-s", str(max(60.0, left - 240)), "--out", str(out / "figures")])
        elif section == "syncs":
            sync_check()
        elif section == "zero" and not args.skip_deepspeed:
            from data.synthhumans.shards import build

            build(out / "synthhumans", 64, 16, height=128, width=96, progress=False)
            for stage in (2, 3):
                for compile_on in (False, True):
                    result = deepspeed_run(stage, out, compile_on)
                    print(
                        f"DeepSpeed ZeRO-{stage} through Lightning, compile {compile_on}: {result}",
                        flush=True,
                    )
        elif section == "checks":
            basic_checks(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
