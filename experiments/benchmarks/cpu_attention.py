"""CPU attention: the fused ``scaled_dot_product_attention`` kernel against attention written out
(``sapiens.models.attention``), side by side in one run.

Two tables, forward + backward, best of ``--rounds`` rounds that take turns:
- the kernels alone, at several token counts, in bf16 and fp32 (batch x tokens held constant);
- a demo-sized training step (MAE pretraining and a pose fine-tune step of ``--model`` at
  ``--height x --width``, bf16 autocast) with the fused kernel forced, and with what ``attention`` picks.

    python -m experiments.benchmarks.cpu_attention                  # demo shapes, 1 thread
    python -m experiments.benchmarks.cpu_attention --threads 2 --tokens 48 192 768
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from experiments.benchmarks._common import load_backbone_shape, time_steps
from sapiens.models.attention import CPU_BF16_EXPLICIT_MAX_TOKENS, explicit_attention, fused_attention
from sapiens.models.heads import HeatmapHead
from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.vit import VisionTransformer


def best_ms(steps: dict[str, Callable[[], None]], repeats: int, rounds: int) -> dict[str, float]:
    """Best milliseconds per call of each step over ``rounds`` rounds of ``repeats`` calls, in turns."""
    for step in steps.values():
        step()  # warm-up
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], time_steps(step, repeats, 0, torch.device("cpu")) * 1e3)
    return best


def kernel_step(kernel: Callable, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype):
    """Forward + backward of one attention call on random (batch, heads, tokens, head_dim) q, k, v."""
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=dtype, requires_grad=True) for _ in "qkv")

    def step() -> None:
        kernel(q, k, v).sum().backward()

    return step


def kernel_table(args: argparse.Namespace) -> str:
    rows = [
        "| dtype | tokens | batch | fused, ms | written out, ms | fused / written out |",
        "|---|---|---|---|---|---|",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for tokens in args.tokens:
            batch = max(1, args.batch * args.reference_tokens // tokens)
            shape = (batch, args.heads, tokens, args.head_dim, dtype)
            ms = best_ms(
                {"fused": kernel_step(F.scaled_dot_product_attention, *shape),
                 "explicit": kernel_step(explicit_attention, *shape)},
                args.repeats,
                args.rounds,
            )  # fmt: skip
            name = str(dtype).removeprefix("torch.")
            rows.append(
                f"| {name} | {tokens} | {batch} | {ms['fused']:.1f} | {ms['explicit']:.1f} | "
                f"{ms['fused'] / ms['explicit']:.2f} |"
            )
    return "\n".join(rows)


def model_steps(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """bf16-autocast training steps (forward, backward, AdamW) of the MAE and of a pose fine-tune."""
    shape = load_backbone_shape(args.model)
    common = dict(
        img_size=(args.height, args.width),
        patch_size=args.patch_size or shape.get("patch_size", 16),
        embed_dim=shape["embed_dim"],
        depth=shape["depth"],
        num_heads=shape["num_heads"],
        mlp_ratio=shape.get("mlp_ratio", 4.0),
    )
    images = torch.randn(args.batch, 3, args.height, args.width)
    mae = MaskedAutoencoder(VisionTransformer(**common, pos_embed="sincos", cls_token=True), 128, 2, 4)
    backbone = VisionTransformer(**common, pos_embed="learned", cls_token=False)
    pose = torch.nn.Sequential(backbone, HeatmapHead(backbone.embed_dim, 17, [64, 64], []))

    def make(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value = loss()
            value.backward()
            optimizer.step()

        return step

    return {"MAE pretraining": make(mae, lambda: mae(images)[0]),
            "pose fine-tune": make(pose, lambda: pose(images).float().square().mean())}  # fmt: skip


def model_table(args: argparse.Namespace) -> str:
    rows = ["| step (bf16 autocast) | fused, ms | as chosen, ms | fused / chosen |", "|---|---|---|---|"]
    for name, step in model_steps(args).items():

        def fused(step=step) -> None:
            with fused_attention():
                step()

        ms = best_ms({"fused": fused, "chosen": step}, args.repeats, args.rounds)
        rows.append(f"| {name} | {ms['fused']:.1f} | {ms['chosen']:.1f} | {ms['fused'] / ms['chosen']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[48, 96, 192, 384, 512, 768])
    parser.add_argument("--reference-tokens", type=int, default=192, help="batch x tokens = batch x this")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--model", default="vit_small", help="a conf/model/<name>.yaml (ViT family)")
    parser.add_argument("--patch-size", type=int, default=8, help="0: the model's (demo: vit_small, 8)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the demo's fine-tunes: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"{args.threads} thread(s); written out on CPU in bf16 up to {CPU_BF16_EXPLICIT_MAX_TOKENS} tokens\n"
    )
    print(f"Attention alone, forward + backward, {args.heads} heads of {args.head_dim}:\n")
    print(kernel_table(args))
    patch = f", patch {args.patch_size}" if args.patch_size else ""
    print(f"\nTraining steps of {args.model}{patch} at {args.height}x{args.width}, batch {args.batch}:\n")
    print(model_table(args))


if __name__ == "__main__":
    main()
