"""Attention: written out on CPU in bf16 for short sequences, the fused kernel elsewhere, one function."""

import torch
import torch.nn.functional as F

from sapiens.models.attention import (
    CPU_BF16_EXPLICIT_MAX_TOKENS,
    attention,
    explicit_attention,
    fused_attention,
)
from sapiens.models.vit import VisionTransformer


def qkv(tokens: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, tokens, 16, generator=g).to(dtype) for _ in range(3)]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, by the textbook formula."""
    q, k, v = (t.double() for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def test_explicit_attention_is_the_fused_kernels_function():
    q, k, v = qkv(48, torch.float32)
    assert torch.allclose(explicit_attention(q, k, v).double(), reference(q, k, v), atol=1e-5)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v).double(), reference(q, k, v), atol=1e-5)


def test_cpu_bf16_short_sequences_are_written_out_and_the_rest_fused():
    short = qkv(48, torch.bfloat16)
    assert torch.equal(attention(*short), explicit_attention(*short))
    long = qkv(CPU_BF16_EXPLICIT_MAX_TOKENS + 1, torch.bfloat16)
    assert torch.equal(attention(*long), F.scaled_dot_product_attention(*long))
    fp32 = qkv(48, torch.float32)  # fused is as fast or faster in fp32 on CPU
    assert torch.equal(attention(*fp32), F.scaled_dot_product_attention(*fp32))
    # Both bf16 paths stay within bf16 rounding of the exact result.
    for q, k, v in (short, long):
        error = (attention(q, k, v).double() - reference(q, k, v)).abs().max()
        assert error < 0.02, error


def test_vit_gradients_match_the_fused_kernel_under_bf16_autocast():
    """A ViT trained in bf16 autocast on CPU takes the written-out path; its loss and gradients stay
    within bf16 rounding of the fused kernel's (which it replaces only for speed)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(64, 48), patch_size=8, embed_dim=64, depth=2, num_heads=4)
    images = torch.randn(2, 3, 64, 48)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(images).float().square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    written_loss, written = loss_and_grads()
    with fused_attention():
        fused_loss, fused = loss_and_grads()
        short = qkv(48, torch.bfloat16)
        assert torch.equal(attention(*short), F.scaled_dot_product_attention(*short))
    assert torch.equal(attention(*short), explicit_attention(*short))  # the limit is back
    assert torch.allclose(written_loss, fused_loss, rtol=0.02)
    for a, b in zip(written, fused, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6
