"""Scaled dot-product attention with the kernel chosen for where it runs.

On GPU, and on CPU in fp32, ``F.scaled_dot_product_attention`` picks the fastest fused kernel. On CPU in
bf16 its fused (flash) kernel is slower than two plain batched matmuls for short sequences: 1.2-5x over a
forward and backward pass up to about 400 tokens (``experiments/benchmarks/cpu_attention.py`` prints the
figures). Every CPU model of the demo, the study and the tests lives there (48-192 tokens), so there
attention is written out. It is the same function, softmax(q k^T / sqrt(hd)) v, up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Up to this many key tokens, CPU bf16 attention is written out. At 512 tokens the two are even; beyond,
# the fused kernel wins and the (N, N) score matrix grows.
CPU_BF16_EXPLICIT_MAX_TOKENS = 384


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with the (B, heads, N, M) score matrix materialised."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, no dropout: q (B, heads, N, hd), k and v (B, heads, M, hd) -> (B, heads, N, hd).

    Written out on CPU in bf16 for up to :data:`CPU_BF16_EXPLICIT_MAX_TOKENS` keys, otherwise
    ``F.scaled_dot_product_attention`` (scale 1 / sqrt(hd) in both)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= CPU_BF16_EXPLICIT_MAX_TOKENS:
        return explicit_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


@contextmanager
def fused_attention() -> Iterator[None]:
    """Within the block every :func:`attention` call takes the fused kernel, on CPU in bf16 too (to compare
    the two, or to measure what GPU training keeps). Not thread-safe: it sets a module-level limit."""
    global CPU_BF16_EXPLICIT_MAX_TOKENS
    limit, CPU_BF16_EXPLICIT_MAX_TOKENS = CPU_BF16_EXPLICIT_MAX_TOKENS, 0
    try:
        yield
    finally:
        CPU_BF16_EXPLICIT_MAX_TOKENS = limit
