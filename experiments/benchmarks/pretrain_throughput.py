"""Training-step throughput of MAE pretraining (or pose fine-tuning) and its share of the device peak.

    python -m experiments.benchmarks.pretrain_throughput --model vit_small --height 256 --width 192 \
        --batch 16 --steps 10 --warmup 2 --device cpu
    python -m experiments.benchmarks.pretrain_throughput --task finetune --model sapiens_0.3b ...
    python -m experiments.benchmarks.pretrain_throughput --task distill ...   # + MAE, and the ratio

A timed step is a full optimisation step: forward, loss, backward and ``AdamW.step`` on random
normalised images (data loading is not included; see ``data_pipeline.py`` for that).

FLOPs are counted analytically (formulas in ``flops.py``), matmuls and convs only.

``--task distill`` (masked reconstruction + self-distillation, ``task=pretrain_distill``; step and FLOPs in
``_distill.py``) also times MAE at the same shapes (model, image size, batch, mask ratio, decoder), the two
in alternating rounds (best of ``--rounds`` each), and prints the ratio per step (= per image: both steps
see the same images) in wall-clock and in process CPU time (less sensitive to other processes' load).

``--flop-check`` also counts one step with ``torch.utils.flop_counter.FlopCounterMode`` and prints
the ratio (close to 1 when the formula covers the model).

``--compile`` compiles the model as ``compile=true`` does in training (block by block:
:mod:`sapiens.models.regional_compile`; ``--compile whole`` compiles the whole model instead); the
compile time (warm-up steps) is printed. AdamW is fused, as in training (``--optimizer foreach`` for
PyTorch's default). ``--reference`` also times a plain MAE built from PyTorch's own layers
(``reference_mae.py``), in alternating rounds (best of ``--rounds`` each), and prints our speed
relative to it; ``--profile N`` prints where the time of N
steps goes (``profile_summary.py``); ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from experiments.benchmarks._common import (
    cpu_matmul_peak,
    device_peak,
    load_backbone_shape,
    si,
    synchronize,
    time_steps,
)
from experiments.benchmarks._distill import (
    DistillBench,
    add_distill_arguments,
    describe_distill,
    distill_inputs,
    distill_step_flops,
)
from experiments.benchmarks.flops import POSE_PATCH_PADDING, block_macs, mae_forward_macs, pose_forward_macs
from experiments.benchmarks.profile_summary import profile_steps
from experiments.benchmarks.reference_mae import ReferenceMAE
from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.regional_compile import compile_regions
from sapiens.models.vit import VisionTransformer


class PoseModel(nn.Module):
    """Backbone feature map -> heatmaps; the fine-tuning network without the Lightning wiring."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, H', W')."""
        return self.head(self.backbone(images))


def build(args: argparse.Namespace) -> tuple[nn.Module, callable, float, callable | None]:
    """Model, a ``loss_fn(model) -> scalar`` closure over fixed random inputs, step FLOPs over the batch,
    and what runs after each optimizer step (the distillation teacher's EMA update; else None)."""
    shape = load_backbone_shape(args.model)
    common = dict(
        img_size=(args.height, args.width),
        patch_size=shape.get("patch_size", 16),
        embed_dim=shape["embed_dim"],
        depth=shape["depth"],
        num_heads=shape["num_heads"],
        mlp_ratio=shape.get("mlp_ratio", 4.0),
        grad_checkpointing=args.grad_checkpointing,
    )
    images = torch.randn(args.batch, 3, args.height, args.width, device=args.device)
    if args.task == "distill":
        model = DistillBench(VisionTransformer(**common, pos_embed="sincos", cls_token=True), args)
        views = distill_inputs(args)
        flops = distill_step_flops(args, shape, mae_forward_macs, block_macs)
        return model, lambda m: m(*views), flops, model.update_teacher
    if args.task == "pretrain":
        encoder = VisionTransformer(**common, pos_embed="sincos", cls_token=True)
        decoder = (args.decoder_dim, args.decoder_depth, args.decoder_heads)
        model = MaskedAutoencoder(encoder, *decoder, mask_ratio=args.mask_ratio)
        macs = mae_forward_macs(shape, args.height, args.width, args.mask_ratio, decoder)
        return model, lambda m: m(images)[0], 6.0 * macs * args.batch, None
    try:
        from sapiens.models.heads import HeatmapHead
    except ImportError as err:
        raise SystemExit(f"--task finetune needs sapiens.models.heads.HeatmapHead: {err}") from None
    backbone = VisionTransformer(
        **common, pos_embed="learned", cls_token=False, patch_padding=POSE_PATCH_PADDING
    )
    deconv, conv = [args.head_channels] * 2, [args.head_channels] * 2
    head = HeatmapHead(backbone.embed_dim, args.keypoints, deconv, conv)
    model = PoseModel(backbone, head)
    with torch.no_grad():
        out_shape = model.to(args.device)(images[:1]).shape
    target = torch.rand(args.batch, *out_shape[1:], device=args.device)
    macs = pose_forward_macs(shape, args.height, args.width, args.keypoints, deconv, conv)
    return model, lambda m: nn.functional.mse_loss(m(images), target), 6.0 * macs * args.batch, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.pretrain_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=["pretrain", "finetune", "distill"], default="pretrain")
    parser.add_argument("--model", default="vit_small", help="a conf/model/<name>.yaml")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    add_distill_arguments(parser)
    parser.add_argument("--keypoints", type=int, default=308, help="finetune: heatmap channels K")
    parser.add_argument("--head-channels", type=int, default=768, help="finetune: head width")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast (weights and AdamW stay fp32)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        default="off",
        choices=["off", "regional", "whole"],
        help="torch.compile: regional (block by block, as compile=true in training; the default when "
        "given without a value) or the whole model",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager...)")
    parser.add_argument("--optimizer", choices=["fused", "foreach"], default="fused", help="AdamW kernel")
    parser.add_argument("--reference", action="store_true", help="also time a plain eager reference MAE")
    parser.add_argument(
        "--rounds", type=int, default=3, help="--reference / distill: alternating timing rounds"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps and summarise")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument(
        "--flop-check", action="store_true", help="also count one step with torch.utils.flop_counter"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    patch = load_backbone_shape(args.model).get("patch_size", 16)
    if args.height % patch or args.width % patch:
        parser.error(f"--height/--width must be multiples of the patch size {patch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    return args


def make_step(model: nn.Module, loss_fn, args: argparse.Namespace, device: torch.device, after_step=None):
    """A full optimisation step of ``model`` (compiled as ``--compile`` says) as a closure; ``after_step``
    runs after the optimizer step (the distillation teacher's EMA update)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=args.optimizer == "fused"
    )
    runner = model
    if args.compile == "regional":
        compile_regions(model, backend=args.compile_backend)
    elif args.compile == "whole":
        runner = torch.compile(model, backend=args.compile_backend)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16"):
            loss = loss_fn(runner)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    return step


def reference_step(args: argparse.Namespace, device: torch.device):
    """A step of :class:`ReferenceMAE` with the same shapes, optimizer and dtype (never compiled)."""
    shape = load_backbone_shape(args.model)
    model = ReferenceMAE(
        (args.height, args.width),
        shape.get("patch_size", 16),
        shape["embed_dim"],
        shape["depth"],
        shape["num_heads"],
        args.decoder_dim,
        args.decoder_depth,
        args.decoder_heads,
        args.mask_ratio,
    ).to(device)
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    plain = argparse.Namespace(**{**vars(args), "compile": "off"})
    return make_step(model, lambda m: m(images), plain, device)


def interleaved_seconds(steps: dict, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Best seconds per step of each of ``steps`` (name -> step) over ``--rounds`` rounds that take
    turns, so that load that comes and goes on a shared machine hits all of them alike; ``<name>_cpu``:
    the best process CPU time per step (all threads), which others' load inflates far less."""
    for step in steps.values():  # warm-up (and compilation) once
        time_steps(step, 1, args.warmup, device)
    best = dict.fromkeys([*steps, *(f"{name}_cpu" for name in steps)], float("inf"))
    for _ in range(args.rounds):
        for name, step in steps.items():
            cpu_start = time.process_time()
            best[name] = min(best[name], time_steps(step, args.steps, 0, device))
            best[f"{name}_cpu"] = min(best[f"{name}_cpu"], (time.process_time() - cpu_start) / args.steps)
    return best


def mae_at_the_same_shapes(args: argparse.Namespace, device: torch.device) -> tuple[callable, float]:
    """(step, step FLOPs) of MAE with ``args``' model, images, batch, mask ratio and decoder."""
    mae_args = copy.copy(args)
    mae_args.task = "pretrain"
    torch.manual_seed(args.seed)
    model, loss_fn, flops, _ = build(mae_args)
    return make_step(model.to(device).train(), loss_fn, mae_args, device), flops


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print a summary and return its figures."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, loss_fn, step_flops, after_step = build(args)
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    step = make_step(model, loss_fn, args, device, after_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_start = time.perf_counter()
    if args.compile != "off":  # the first steps compile (forward, then backward): time them apart
        for _ in range(2):
            step()
        synchronize(device)
    warmup_s = time.perf_counter() - compile_start

    # On a shared CPU the matmul peak is measured before and after the timed steps and the higher
    # value kept, so that a burst of foreign load does not inflate the fraction of peak.
    peak_before = cpu_matmul_peak() if device.type == "cpu" else 0.0
    if args.reference:
        if args.task != "pretrain":
            raise SystemExit("--reference compares MAE steps: use it with --task pretrain")
        timed = interleaved_seconds({"ours": step, "reference": reference_step(args, device)}, args, device)
        seconds, ref = timed["ours"], timed["reference"]
    elif args.task == "distill":
        mae_step, mae_flops = mae_at_the_same_shapes(args, device)
        timed = interleaved_seconds({"ours": step, "mae": mae_step}, args, device)
        seconds = timed["ours"]
    else:
        seconds = time_steps(step, args.steps, args.warmup, device)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    achieved = step_flops / seconds
    peak, peak_source = device_peak(device, args.dtype)
    if peak is not None:
        peak = max(peak, peak_before)
    results = {
        "seconds_per_step": seconds,
        "images_per_s": args.batch / seconds,
        "step_flops": float(step_flops),
        "flops_per_s": achieved,
        "peak_flops_per_s": peak or float("nan"),
        "peak_fraction": achieved / peak if peak else float("nan"),
        "peak_memory_gib": peak_memory,
        "compile_warmup_s": warmup_s if args.compile != "off" else 0.0,
    }
    where = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"task: {args.task}  model: {args.model} ({params / 1e6:.1f} M params)  "
        f"image: {args.height}x{args.width}  batch: {args.batch}  dtype: {args.dtype}  "
        f"grad_checkpointing: {args.grad_checkpointing}  compile: {args.compile}  AdamW: {args.optimizer}"
    )
    if args.task in ("pretrain", "distill"):
        print(
            f"mask_ratio: {args.mask_ratio}  decoder: {args.decoder_dim}/{args.decoder_depth}/"
            f"{args.decoder_heads}"
        )
    if args.task == "distill":
        print(describe_distill(args))
    print(
        f"device: {where}  threads: {torch.get_num_threads()}  steps: {args.steps} (+{args.warmup} warm-up)"
    )
    if args.compile != "off":
        print(f"compile: first 2 steps took {warmup_s:.1f} s (compilation included)")
    print(f"seconds/step: {seconds:.4f}")
    print(f"images/s: {results['images_per_s']:.4g}")
    how = "3 x 2 x student MACs + 2 x teacher MACs" if args.task == "distill" else "3 x 2 x MACs"
    print(f"model FLOPs/step (analytic, {how}): {si(step_flops, 'FLOP')}")
    print(f"achieved: {si(achieved, 'FLOP/s')}")
    if peak:
        print(f"peak: {si(peak, 'FLOP/s')} ({peak_source})")
        print(f"fraction of peak: {100 * results['peak_fraction']:.3g} %")
    else:
        print(f"peak: unknown ({peak_source})")
    if device.type == "cuda":
        print(f"peak memory: {peak_memory:.2f} GiB")
    if args.reference:
        results["reference_seconds_per_step"] = ref
        results["speed_vs_reference"] = ref / seconds
        print(f"reference MAE (PyTorch layers, eager): {ref:.4f} s/step; ours at {ref / seconds:.2f}x")
    if args.task == "distill":
        results.update(
            mae_seconds_per_step=timed["mae"],
            mae_step_flops=mae_flops,
            distill_over_mae=seconds / timed["mae"],
            distill_over_mae_cpu=timed["ours_cpu"] / timed["mae_cpu"],
        )
        print(
            f"distill / MAE at the same shapes: {results['distill_over_mae']:.2f}x the time per step "
            f"({seconds:.4f} s vs {timed['mae']:.4f} s, best of {args.rounds} alternating rounds; "
            f"{args.global_crops} global + {args.local_crops} local views per image)"
        )
        print(
            f"process CPU time per step: {timed['ours_cpu']:.4f} s vs {timed['mae_cpu']:.4f} s = "
            f"{results['distill_over_mae_cpu']:.2f}x; analytic FLOPs: {step_flops / mae_flops:.2f}x"
        )
    if args.profile:
        print(profile_steps(step, args.profile, device))
    if args.flop_check:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        synchronize(device)
        counted = counter.get_total_flops()
        results["flop_counter_ratio"] = counted / step_flops
        print(
            f"FlopCounterMode FLOPs/step: {si(counted, 'FLOP')} "
            f"(counted / analytic = {counted / step_flops:.3f})"
        )
        print(
            "  (the counter has no formula for the CPU flash-attention kernel, so on CPU it misses "
            "the attention matmuls; with --grad-checkpointing it adds the recomputed forward)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **results}, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
