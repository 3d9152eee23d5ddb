"""The Sapiens2 backbone (Khirodkar et al., ICLR 2026), a clean re-implementation from the facts in
reference sapiens2.md section 1.

Architecture: 16x16 patch-embed conv (padding 0), token sequence ``[cls, 8 registers, patches]``, no absolute
position embedding (2D axial RoPE, base 100, on patch tokens only), pre-norm blocks

    x = x + gamma * attn(norm1(x))          layer scale on attention only (init 1e-4)
    x = x + w3(silu(gate) * value)          [gate, value] = w12(norm2(x)).chunk(2); hidden 4 D

with RMSNorm (eps 1e-6, weight only) everywhere, separate ``wq`` / ``wk`` / ``wv`` projections (bias),
per-head RMSNorm on q and k before RoPE, grouped-query attention with half the heads as KV heads in all but
the first 8 and last 8 blocks, and a final RMSNorm. The 4K variant puts a window tokenizer
(:mod:`sapiens.models.sapiens2_tokenizer`) between the patch embedding and the trunk.

Parameter names are ours (``patch_embed.proj``, ``register_tokens``, ``blocks.i.norm1``, ``norm``, as in
``vit.py``); the published names (``patch_embed.projection``, ``storage_tokens``, ``blocks.i.ln1``, ``ln1``)
map onto them by the rename table in ``sapiens.checkpoints.sapiens2``.

Encoder API (shared with :class:`sapiens.models.vit.VisionTransformer`; what MAE and other pretraining
objectives use, never the block internals):

- ``embed(images) -> (tokens (B, L, D), grid (h, w))``: patch tokens in raster order (absolute positions added
  by families that have them; none here);
- ``encode(tokens, grid, positions=None) -> (B, P + K, D)``: prepend the P = ``num_prefix_tokens`` prefix
  tokens (cls first, then registers), run the blocks and the final norm. ``positions`` (B, K) long are the
  raster indices in ``grid`` of the K given tokens (None: all L tokens in order); here they pick each kept
  token's RoPE angles, so a masked subset keeps its true positions;
- ``forward_features(images) -> (B, P + h*w, D)``, ``forward(images) -> (B, D, h, w)`` feature map;
- ``embed_dim``, ``depth``, ``patch_size``, ``num_prefix_tokens``, ``grid_size``, ``layer_id(name)``,
  ``no_weight_decay()``, ``set_grad_checkpointing(enable)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sapiens.models.attention import attention
from sapiens.models.backbone import Backbone, drop_path
from sapiens.models.rope import RopePositionEmbedding, apply_rope
from sapiens.models.vit import PatchEmbed

NORM_EPS = 1e-6
# Published arch zoo (reference sapiens2.md section 1): width, depth, heads, 4K tokenizer layers. Head widths
# follow (64, 64, 80, 64, 76); every size has GQA with heads / 2 KV heads outside the first and last 8 blocks.
ARCHS: dict[str, dict[str, int]] = {
    "sapiens2_0.1b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "tokenizer_depth": 2},
    "sapiens2_0.4b": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "tokenizer_depth": 2},
    "sapiens2_0.8b": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "tokenizer_depth": 3},
    "sapiens2_1b": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "tokenizer_depth": 4},
    "sapiens2_5b": {"embed_dim": 2432, "depth": 56, "num_heads": 32, "tokenizer_depth": 6},
}


class LayerScale(nn.Module):
    """Per-channel scale ``x * weight`` (published key ``gamma.weight``)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.weight = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return x * self.weight


class GroupedQueryAttention(nn.Module):
    """Self-attention with separate q / k / v projections, optional qk-norm, RoPE and grouped KV heads.

    Query head h attends with KV head ``h // (num_heads / num_kv_heads)`` (KV heads are repeated with
    ``repeat_interleave``), so ``num_kv_heads == num_heads`` is plain multi-head attention.

    Args:
        dim: model width D; num_heads: query heads; num_kv_heads: KV heads (divides num_heads).
        qkv_bias: biases on wq / wk / wv. qk_norm: per-head RMSNorm on q and k (the trunk; not the tokenizer).
        layer_scale: initial value of the output layer scale ``gamma`` (None: no layer scale).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        layer_scale: float | None = 1e-4,
    ):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"width {dim} must split into {num_heads} heads, and those into {num_kv_heads} KV heads"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.gamma = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_prefix: int = 0,
    ) -> torch.Tensor:
        """x: (B, P + N, D); rope: (sin, cos) of the N patch tokens, (N, hd) or (B, N, hd), or None.

        Returns (B, P + N, D).
        """
        b, n, d = x.shape
        q = self.q_norm(self.wq(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope, num_prefix)
            k = apply_rope(k, *rope, num_prefix)
        if self.num_kv_heads != self.num_heads:
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = attention(q, k, v)  # (B, heads, P + N, hd), scale 1 / sqrt(hd)
        return self.gamma(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class SwiGLUFFN(nn.Module):
    """``w3(silu(gate) * value)``, ``[gate, value] = w12(x).chunk(2)`` (published layout; hidden = 4 D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Sapiens2Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, ``x + ffn(norm2(x))``, optional stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        layer_scale: float | None = 1e-4,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = GroupedQueryAttention(dim, num_heads, num_kv_heads, qkv_bias, qk_norm, layer_scale)
        self.norm2 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.ffn = SwiGLUFFN(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_path, self.training)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, num_prefix: int = 0
    ) -> torch.Tensor:
        """x: (B, P + N, D) -> (B, P + N, D)."""
        x = x + self._drop(self.attn(self.norm1(x), rope, num_prefix))
        return x + self._drop(self.ffn(self.norm2(x)))


def kv_heads_per_block(
    depth: int, num_heads: int, num_kv_heads: int | None = None, mhsa_early: int = 8, mhsa_late: int = 8
) -> list[int]:
    """KV heads of every block: ``num_heads`` in the first ``mhsa_early`` and last ``mhsa_late`` blocks,
    ``num_kv_heads`` (default ``num_heads // 2``) in between (none in between for depth <= 16)."""
    grouped = num_heads // 2 if num_kv_heads is None else num_kv_heads
    return [num_heads if i < mhsa_early or i >= depth - mhsa_late else grouped for i in range(depth)]


class Sapiens2(Backbone):
    """Sapiens2 backbone with the encoder API of the module docstring.

    Args:
        img_size: (H, W) the model is built for (sets ``grid_size``; any size divisible by the stride runs).
        patch_size: 16 published. in_chans: 3.
        embed_dim, depth, num_heads: trunk shape (see :data:`ARCHS`).
        num_kv_heads: KV heads of the grouped blocks (default num_heads / 2).
        mhsa_early, mhsa_late: blocks at either end with full multi-head attention (8 / 8).
        mlp_ratio: SwiGLU hidden size / D (4). qkv_bias: biases on wq / wk / wv (True).
        num_register_tokens: registers after the cls token (8).
        rope_base: RoPE period base (100). rope_dtype: ``"bf16"`` (published) or ``"fp32"``.
        layer_scale_init: attention layer-scale init (1e-4).
        patch_padding: patch-embed padding (0 published).
        drop_path_rate: stochastic depth, linear over blocks (0).
        grad_checkpointing: recompute each block in the backward pass.
        use_tokenizer: the 4K variant (4096x3072 input; 4x4 windows of patches pooled into one token each).
        tokenizer_depth: blocks of the 4K tokenizer (the published count per size is in :data:`ARCHS`).
        tokenizer_window: window side in patches (4). tokenizer_chunk: windows per chunk (1024).
    """

    # layer 0 of layer-wise lr decay (published base_runner rule; rope_embed holds no parameter)
    family = "sapiens2"  # key table in sapiens.checkpoints.sapiens2
    embedding_names = ("cls_token", "register_tokens", "patch_embed", "tokenizer")

    def __init__(
        self,
        img_size: Sequence[int] = (1024, 768),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        num_kv_heads: int | None = None,
        mhsa_early: int = 8,
        mhsa_late: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_register_tokens: int = 8,
        rope_base: float = 100.0,
        rope_dtype: str = "bf16",
        layer_scale_init: float = 1e-4,
        patch_padding: int = 0,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        use_tokenizer: bool = False,
        tokenizer_depth: int = 0,
        tokenizer_window: int = 4,
        tokenizer_chunk: int = 1024,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.feature_stride = patch_size * (tokenizer_window if use_tokenizer else 1)
        img_size = tuple(img_size)
        if img_size[0] % self.feature_stride or img_size[1] % self.feature_stride:
            raise ValueError(
                f"image size {img_size} is not divisible by the patch size {patch_size}"
                + (f" x tokenizer window {tokenizer_window}" if use_tokenizer else "")
            )
        self.grid_size = (img_size[0] // self.feature_stride, img_size[1] // self.feature_stride)
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, rope_base, rope_dtype)
        self.tokenizer = None
        if use_tokenizer:
            from sapiens.models.sapiens2_tokenizer import WindowTokenizer

            if tokenizer_depth < 1:
                raise ValueError("use_tokenizer=True needs tokenizer_depth >= 1 (published 2 to 6 by size)")
            self.tokenizer = WindowTokenizer(
                embed_dim, num_heads, tokenizer_depth, tokenizer_window, mlp_ratio, qkv_bias, tokenizer_chunk
            )
        kv = kv_heads_per_block(depth, num_heads, num_kv_heads, mhsa_early, mhsa_late)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Sapiens2Block(embed_dim, num_heads, kv[i], mlp_ratio, qkv_bias, True, layer_scale_init, rates[i])
            for i in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=NORM_EPS)
        self.init_weights()

    # ------------------------------------------------------------------ init and API
    @torch.no_grad()
    def init_weights(self) -> None:
        """Published init: trunc-normal(0.02) Linear and conv weights (and prefix tokens), zero biases,
        norms 1, layer scales at their init value."""
        if self.cls_token.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, LayerScale):
                m.weight.fill_(m.init_value)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.register_tokens, std=0.02)
        self.rope_embed.reset_parameters()
        if self.tokenizer is not None:
            self.tokenizer.init_tokens()

    def no_weight_decay(self) -> set[str]:
        """None beyond the optimizer's rule (1-D params, biases, ``*pos_embed*``): the published Sapiens2
        recipe decays the cls and register tokens."""
        return set()

    # ------------------------------------------------------------------ encoder API
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: (B, 3, H, W) -> patch tokens (B, L, D) in raster order and their grid (h, w); with the 4K
        tokenizer one token per window, grid (H / 64, W / 64)."""
        tokens, grid = self.patch_embed(x)
        if self.tokenizer is not None:
            tokens, grid = self.tokenizer(tokens, grid)
        return tokens, grid

    def encode(
        self, tokens: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, K, D) of ``grid``, at raster ``positions`` (B, K) (None: all tokens in order)
        -> normalised (B, P + K, D) with the P prefix tokens [cls, registers] first."""
        b = tokens.shape[0]
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(b, -1, -1)
        x = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        sin, cos = self.rope_embed(grid)
        if positions is not None:
            sin, cos = sin[positions], cos[positions]  # (B, K, hd): each kept token keeps its own angles
        rope, p = (sin, cos), self.num_prefix_tokens
        for block in self.blocks:
            x = self.run_block(block, x, rope, p)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> normalised tokens (B, 9 + h*w, D): cls, 8 registers, patches."""
        tokens, grid = self.embed(x)
        return self.encode(tokens, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> feature map (B, D, H/16, W/16) (H/64, W/64 with the 4K tokenizer)."""
        tokens, (h, w) = self.embed(x)
        out = self.encode(tokens, (h, w))[:, self.num_prefix_tokens :]
        return out.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)
