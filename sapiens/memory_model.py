"""How much GPU memory does a Sapiens ViT or Sapiens2 backbone need per GPU, per ZeRO stage? Analytic model.

Run ``python -m sapiens.memory_model [--gpus 8] [--height 1024 --width 768] [--batch 1]`` for a
Markdown table per model size. Everything is a formula (below); nothing is measured, so use it to
choose a strategy (DDP / ZeRO-1/2/3, activation checkpointing), then confirm on the GPU.

Parameters (backbone only, task heads excluded), ViT of width d, depth L, MLP ratio r, patch p:
    per block      (2 + 2r) d^2 + (9 + r) d   (= 12 d^2 + 13 d for r = 4: qkv, proj, fc1, fc2, 2 LN)
    patch embed    3 p^2 d + d                (conv weight + bias)
    pos embed      T d (+ d for the cls row)  T = (H/p)(W/p) tokens
    cls token      d (pretraining only)
    final norm     2 d

Model states with bf16 mixed precision (the ZeRO paper's accounting, DeepSpeed ``bf16``), for
P trainable parameters on N GPUs:
    bf16 params 2P, bf16 grads 2P, AdamW states 12P (fp32 master copy + 2 fp32 moments)
    stage 0 (DDP)   2P      + 2P      + 12P      (nothing sharded)
    stage 1         2P      + 2P      + 12P / N  (optimizer states sharded)
    stage 2         2P      + 2P / N  + 12P / N  (+ gradients sharded)
    stage 3         2P / N  + 2P / N  + 12P / N  (+ parameters sharded)
(Lightning ``bf16-mixed`` under plain DDP keeps fp32 params and grads instead: 4P + 4P + 8P, the
same 16P total as stage 0.)

Activations saved for backward, per sample, in bf16 (v = 2 bytes/value), with the
``scaled_dot_product_attention`` flash / memory-efficient kernels (no T x T score matrix kept):
    per block   A = v T (d (8 + 2r) + 4) + 4 T h   (bytes; ~16 T d values for r = 4, h heads)
      saved values: LN1 input, qkv input, q, k, v, attention output (= proj input), LN2 input,
      fc1 input (1 T d each = 8 T d), GELU input and fc2 input (r T d each), LayerNorm mean and
      rstd (2 x 2 T); + fp32 softmax log-sum-exp (T h values); no dropout masks (none in Sapiens).
    stem        S = v (3 H W + T d + 2 T)      (input image for the patch conv, final-norm input
                                                and its statistics)
    no checkpointing       L A + S
    block checkpointing    L v T d + A + S     (each block keeps only its input; one block's
                                                activations live again while it is recomputed)
Sapiens2 (``family="sapiens2"``; width d, h heads of width e = d / h, kv KV heads in the grouped blocks, 8
registers): parameters per block 14 d^2 + 2 d k + 14 d + 2 k + 2 e with k = kv e (= 16 d^2 + 16 d + 2 e with
full multi-head attention), stem 3 p^2 d + d + 9 d, final norm d. Activations per block, T = patches + 9
prefix tokens, r = kv / h, measured against autograd's saved tensors in bf16:
    A = v T d (36 + 4 r) + 4 T (2 + h + kv) + 4 T h
      RMSNorm as PyTorch decomposes it keeps fp32 copies of its input and normalised output (4 units per norm:
      norm1, norm2, q-norm, and 4 r for k-norm) and fp32 rstd; wq/wk/wv input, q, expanded k and v, the
      attention output (4), proj input, layer-scale input, w12 input (3), w12 output 8, SiLU output 4, w3
      input 4; the fp32 softmax log-sum-exp. A fused RMSNorm kernel would save less.
    stem S = v 3 H W + 4 v T d + 4 T    (image, final norm)

Not modelled: task heads and their activations, CUDA context (~0.5-1 GiB), allocator
fragmentation, temporary buffers, DeepSpeed communication buckets (Lightning docs: ~3.6 GB for the
2e8 defaults), and autocast keeping the residual stream in fp32 (~+4 T d bytes per block).

Self-distillation pretraining (``--objective distill``): :mod:`sapiens.distill_memory`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class VitShape:
    """Transformer dimensions of one model size."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0
    family: str = "vit"  # or "sapiens2"
    num_kv_heads: int = 0  # Sapiens2: KV heads of the grouped blocks (all but the first and last 8)

    def kv_heads(self) -> list[int]:
        """KV heads per block (Sapiens2: heads in the first and last 8 blocks, ``num_kv_heads`` between)."""
        return [
            self.num_heads if i < 8 or i >= self.depth - 8 else self.num_kv_heads for i in range(self.depth)
        ]


SAPIENS_SIZES: dict[str, VitShape] = {
    s.name: s
    for s in (
        VitShape("sapiens_0.3b", 1024, 24, 16),
        VitShape("sapiens_0.6b", 1280, 32, 16),
        VitShape("sapiens_1b", 1536, 40, 24),
        VitShape("sapiens_2b", 1920, 48, 32),
        VitShape("sapiens2_0.1b", 768, 12, 12, family="sapiens2", num_kv_heads=6),
        VitShape("sapiens2_0.4b", 1024, 24, 16, family="sapiens2", num_kv_heads=8),
        VitShape("sapiens2_0.8b", 1280, 32, 16, family="sapiens2", num_kv_heads=8),
        VitShape("sapiens2_1b", 1536, 40, 24, family="sapiens2", num_kv_heads=12),
        VitShape("sapiens2_5b", 2432, 56, 32, family="sapiens2", num_kv_heads=16),
    )
}

# Backbone parameter counts of the published models at 1024x1024 with the cls token (billions).
PUBLISHED_BACKBONE_PARAMS: dict[str, float] = {
    "sapiens_0.3b": 0.307e9,
    "sapiens_0.6b": 0.636e9,
    "sapiens_1b": 1.141e9,
    "sapiens_2b": 2.134e9,
    # Sapiens2: the reference's count from the published key layout (its README says 0.114 / 0.398 / 0.818
    # / 1.462 / 5.071 B; the gap for 0.4b-5b is unexplained, see tests/test_sapiens2.py).
    "sapiens2_0.1b": 113.99e6,
    "sapiens2_0.4b": 395.45e6,
    "sapiens2_0.8b": 814.28e6,
    "sapiens2_1b": 1455.47e6,
    "sapiens2_5b": 5066.90e6,
}
SAPIENS2_PREFIX = 9  # cls + 8 registers

BF16_BYTES = 2
FP32_BYTES = 4
ADAMW_STATE_BYTES = 3 * FP32_BYTES  # fp32 master weights + first and second moments


def _tokens(shape: VitShape, height: int, width: int) -> int:
    if height % shape.patch_size or width % shape.patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {shape.patch_size}")
    return (height // shape.patch_size) * (width // shape.patch_size)


def count_parameters(shape: VitShape, height: int, width: int, cls_token: bool) -> int:
    """Backbone parameter count from the formula in the module docstring.

    Args:
        shape: model dimensions.
        height, width: image size the position table is built for (pixels, multiples of the patch).
        cls_token: True for the pretraining layout (cls token + its position row).
    """
    if shape.family == "sapiens2":  # no position table, no cls choice: the same count at any size
        d, e = shape.embed_dim, shape.embed_dim // shape.num_heads
        blocks = sum(14 * d * d + 2 * d * kv * e + 14 * d + 2 * kv * e + 2 * e for kv in shape.kv_heads())
        return blocks + 3 * shape.patch_size**2 * d + d + SAPIENS2_PREFIX * d + d
    d, r = shape.embed_dim, shape.mlp_ratio
    hidden = int(d * r)
    per_block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 2 * 2 * d
    patch = 3 * shape.patch_size**2 * d + d
    pos = (_tokens(shape, height, width) + int(cls_token)) * d
    return shape.depth * per_block + patch + pos + int(cls_token) * d + 2 * d


def count_parameters_of_model(shape: VitShape, height: int, width: int, cls_token: bool) -> int | None:
    """Count by building the backbone (``VisionTransformer`` or ``Sapiens2``) on the meta device (no memory).

    Returns None when the backbone module is not available (e.g. this file used on its own).
    """
    try:
        import torch

        from sapiens.models.sapiens2 import Sapiens2
        from sapiens.models.vit import VisionTransformer
    except ImportError:
        return None
    common = {
        "img_size": (height, width),
        "patch_size": shape.patch_size,
        "embed_dim": shape.embed_dim,
        "depth": shape.depth,
        "num_heads": shape.num_heads,
    }
    with torch.device("meta"):
        if shape.family == "sapiens2":
            model = Sapiens2(**common, num_kv_heads=shape.num_kv_heads)
        else:
            pos = "sincos" if cls_token else "learned"
            model = VisionTransformer(**common, mlp_ratio=shape.mlp_ratio, pos_embed=pos, cls_token=cls_token)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelStateMemory:
    """Bytes per GPU of parameters, gradients and optimizer states."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_state_memory(num_params: int, stage: int, num_gpus: int) -> ModelStateMemory:
    """Per-GPU model-state bytes for bf16 mixed precision + AdamW under ZeRO ``stage`` (0-3).

    Stage 0 is plain data parallelism; stage k shards the first k of (optimizer states, gradients,
    parameters) over ``num_gpus`` (module docstring).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    n = float(num_gpus)
    params = BF16_BYTES * num_params / (n if stage >= 3 else 1)
    grads = BF16_BYTES * num_params / (n if stage >= 2 else 1)
    optimizer = ADAMW_STATE_BYTES * num_params / (n if stage >= 1 else 1)
    return ModelStateMemory(params, grads, optimizer)


def activation_bytes_per_sample(
    shape: VitShape, height: int, width: int, checkpointing: bool, bytes_per_value: int = BF16_BYTES
) -> int:
    """Activation bytes saved for backward for ONE image (formula in the module docstring).

    Args:
        shape: model dimensions.
        height, width: input image size in pixels (fine-tuning: 1024x768 -> 3072 tokens).
        checkpointing: True when every block is recomputed in the backward pass.
        bytes_per_value: 2 for bf16/fp16 activations, 4 for fp32.
    """
    parts = activation_breakdown(shape, height, width, bytes_per_value)
    if checkpointing:
        return parts["block_inputs"] + parts["per_block"] + parts["stem"]
    return parts["blocks"] + parts["stem"]


def activation_breakdown(
    shape: VitShape, height: int, width: int, bytes_per_value: int = BF16_BYTES
) -> dict[str, int]:
    """The terms of :func:`activation_bytes_per_sample`, bytes for one image.

    Returns:
        ``per_block`` (A: everything the largest block saves), ``blocks`` (all blocks), ``stem`` (S),
        ``block_inputs`` (L v T d: what checkpointed blocks keep between forward and backward).
    """
    tokens = _tokens(shape, height, width)
    d, v, h = shape.embed_dim, bytes_per_value, shape.num_heads
    if shape.family == "sapiens2":
        tokens += SAPIENS2_PREFIX
        per = [
            v * tokens * d * (36 + 4 * kv / h) + FP32_BYTES * tokens * (2 + h + kv) + FP32_BYTES * tokens * h
            for kv in shape.kv_heads()
        ]
        stem = v * 3 * height * width + 4 * v * tokens * d + FP32_BYTES * tokens
        blocks = {"per_block": int(max(per)), "blocks": int(sum(per))}
        return {**blocks, "stem": stem, "block_inputs": shape.depth * v * tokens * d}
    hidden_values = 8 * d + 2 * int(d * shape.mlp_ratio) + 4
    per_block = v * tokens * hidden_values + FP32_BYTES * tokens * h
    stem = v * (3 * height * width + tokens * d + 2 * tokens)
    blocks = {"per_block": per_block, "blocks": shape.depth * per_block}
    return {**blocks, "stem": stem, "block_inputs": shape.depth * v * tokens * d}


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}"


def size_report(shape: VitShape, gpus: int, height: int, width: int, batch: int) -> str:
    """Markdown section (heading, parameter counts, table) for one model size."""
    finetune_params = count_parameters(shape, height, width, cls_token=False)
    pretrain_params = count_parameters(shape, 1024, 1024, cls_token=True)
    built = count_parameters_of_model(shape, height, width, cls_token=False)
    check = (
        "not checked (sapiens.models unavailable)"
        if built is None
        else ("equal to the built model" if built == finetune_params else f"built model has {built:,}")
    )
    act = activation_bytes_per_sample(shape, height, width, checkpointing=False)
    act_ckpt = activation_bytes_per_sample(shape, height, width, checkpointing=True)
    tokens = _tokens(shape, height, width)
    published = PUBLISHED_BACKBONE_PARAMS.get(shape.name, float("nan")) / 1e9
    prefix = f" + {SAPIENS2_PREFIX} prefix" if shape.family == "sapiens2" else ""
    if shape.family == "sapiens2":
        params = [
            f"- parameters (no position table: the same at any image size and in both roles): "
            f"{finetune_params:,} ({check}; reference {published:.4f} B)"
        ]
    else:
        params = [
            f"- parameters trained at {height}x{width} (no cls, learned pos embed): "
            f"{finetune_params:,} ({check})",
            f"- parameters at 1024x1024 with cls (pretraining layout): {pretrain_params:,} "
            f"(published {published:.3f} B)",
        ]
    lines = [
        f"### {shape.name} (width {shape.embed_dim}, depth {shape.depth}, "
        f"{shape.num_heads} heads, patch {shape.patch_size})",
        "",
        *params,
        f"- activations per sample ({tokens} patch tokens{prefix}): "
        f"{_gib(act)} GiB, "
        f"{_gib(act_ckpt)} GiB with activation checkpointing",
        "",
        f"| ZeRO stage | params | grads | AdamW states | model states | "
        f"+ activations (batch {batch}) | + checkpointed activations |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in range(4):
        mem = zero_state_memory(finetune_params, stage, gpus)
        label = "0 (DDP)" if stage == 0 else str(stage)
        lines.append(
            f"| {label} | {_gib(mem.params)} | {_gib(mem.grads)} | {_gib(mem.optimizer)} | "
            f"{_gib(mem.total)} | {_gib(mem.total + batch * act)} | "
            f"{_gib(mem.total + batch * act_ckpt)} |"
        )
    return "\n".join(lines)


def report(
    gpus: int = 8,
    height: int = 1024,
    width: int = 768,
    batch: int = 1,
    sizes: list[str] | None = None,
) -> str:
    """The full Markdown report: one section per model size, GiB per GPU."""
    names = sizes or list(SAPIENS_SIZES)
    unknown = [n for n in names if n not in SAPIENS_SIZES]
    if unknown:
        raise ValueError(f"unknown model size(s) {unknown}; choose from {list(SAPIENS_SIZES)}")
    head = (
        f"## Memory per GPU (GiB): {gpus} GPU(s), {height}x{width} input, batch {batch} per GPU, "
        "bf16 mixed precision, AdamW\n\nFormulas: `python -c 'import sapiens.memory_model as m; "
        "help(m)'`. Backbone only; add the task head, ~1 GiB CUDA context and communication "
        "buckets."
    )
    body = [size_report(SAPIENS_SIZES[n], gpus, height, width, batch) for n in names]
    return "\n\n".join([head, *body]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sapiens.memory_model",
        description="Per-GPU memory of Sapiens ViTs per ZeRO stage (analytic; Markdown).",
    )
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ZeRO shards)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1, help="samples per GPU")
    parser.add_argument("--sizes", nargs="*", default=None, help=f"subset of {list(SAPIENS_SIZES)}")
    parser.add_argument(
        "--objective",
        choices=["finetune", "distill"],
        default="finetune",
        help="distill: the extra memory of task=pretrain_distill (student heads, EMA teacher)",
    )
    args = parser.parse_args(argv)
    try:
        if args.objective == "distill":
            from sapiens.distill_memory import distill_report

            unknown = [n for n in args.sizes or [] if n not in SAPIENS_SIZES]
            if unknown:
                raise ValueError(f"unknown model size(s) {unknown}; choose from {list(SAPIENS_SIZES)}")
            print(distill_report(args.gpus, args.sizes), end="")
            return
        print(report(args.gpus, args.height, args.width, args.batch, args.sizes), end="")
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
