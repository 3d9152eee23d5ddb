"""The Sapiens Vision Transformer backbone.

Architecture (published Sapiens / mmpretrain ``VisionTransformer``): 16x16 patch-embed conv, pre-norm blocks
``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm eps 1e-6, fused qkv with bias, exact GELU,
MLP ratio 4, no layer scale, a final LayerNorm.

Two position-embedding modes:
- ``"sincos"`` (pretraining): a frozen 2D sin-cos table with a cls token row;
- ``"learned"`` (fine-tuning): a learnable table without cls, on the fine-tuning patch grid.

Parameter names follow timm (``blocks.i.norm1``, ``mlp.fc1``, ``norm``...). The published checkpoint keys
(``layers.i.ln1``, ``ffn.layers.0.0``, ``ln1``...) map onto them by the plain rename in
``sapiens.checkpoints``. Loading a table of another shape (cls row, other grid) is handled in
``_load_from_state_dict``: the cls row is stripped and the grid bicubically resized, as Sapiens does.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens.models.attention import attention
from sapiens.models.backbone import Backbone, drop_path
from sapiens.models.pos_embed import infer_grid, resize_pos_embed, sincos_2d

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, run through :func:`attention` (fused kernels
    on GPU, written out for short sequences in bf16 on CPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer feed-forward network with exact GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale), optional stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_path, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding conv; ``padding=2`` reproduces the pose/normal fine-tune configs."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, padding: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: (B, 3, H, W) -> tokens (B, h*w, C) and the grid (h, w)."""
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class VisionTransformer(Backbone):
    """Sapiens ViT backbone with the timm-style model API.

    Args:
        img_size: (H, W) the position table is built for; other sizes are resized at run time.
        patch_size: patch side (16 for every Sapiens model).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        patch_padding: zero padding of the patch-embed conv (0, or 2 for pose / normals).
        pos_embed: ``"sincos"`` (fixed, pretraining) or ``"learned"`` (fine-tuning).
        cls_token: prepend a learnable cls token (pretraining) or not (fine-tuning).
        drop_path_rate: stochastic depth, linearly increasing over blocks (0 in every Sapiens config).
        grad_checkpointing: recompute each block in the backward pass to save activation memory.
    """

    family = "vit"  # key table in sapiens.checkpoints.vit
    embedding_names = ("cls_token", "pos_embed", "patch_embed")

    def __init__(
        self,
        img_size: tuple[int, int] = (1024, 1024),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_padding: int = 0,
        pos_embed: str = "sincos",
        cls_token: bool = True,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        img_size = tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_prefix_tokens = 1 if cls_token else 0
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        num_pos = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        learned = pos_embed == "learned"
        # Frozen sin-cos tables stay Parameters (requires_grad=False) so they are saved under the published
        # key ``pos_embed`` and counted like the published models.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim), requires_grad=learned)
        self.pos_embed_type = pos_embed
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.init_weights()

    # ------------------------------------------------------------------ init and API
    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE init: xavier-uniform Linear and (flattened) patch conv, LN 1/0, cls N(0, 0.02)."""
        if self.pos_embed.device.type == "meta":
            return
        if self.pos_embed_type == "sincos":
            table = sincos_2d(self.grid_size, self.embed_dim, cls_token=self.cls_token is not None)
            self.pos_embed.copy_(table)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_module)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that get no weight decay besides biases and norms."""
        return {"pos_embed", "cls_token"}

    # ------------------------------------------------------------------ forward
    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed patches and add the (resized if needed) position embedding, without prefix tokens.

        x: (B, 3, H, W) -> tokens (B, h*w, C), grid (h, w).
        """
        tokens, grid = self.patch_embed(x)
        return tokens + self.grid_pos_embed(grid), grid

    def grid_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Spatial position table for ``grid``: (1, h*w, C), bicubic-resized when the grid differs."""
        table = self.pos_embed[:, self.num_prefix_tokens :]
        if tuple(grid) == self.grid_size:
            return table
        return resize_pos_embed(table, grid, old_hw=self.grid_size)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, 1+N, C) with the cls token (its position row added) when the model has one."""
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the transformer blocks and the final norm: (B, N, C) -> (B, N, C)."""
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    # Encoder API shared by every backbone family (see sapiens.models.factory): MAE and other pretraining
    # objectives mask tokens between ``embed`` and ``encode``.
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: (B, 3, H, W) -> patch tokens (B, L, C), absolute positions added, and the grid (h, w)."""
        return self.patch_tokens(x)

    def encode(
        self, tokens: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, K, C) -> normalised (B, [1 +] K, C), cls first. ``grid`` and ``positions`` (B, K) are
        not needed: :meth:`embed` already added each token's absolute position."""
        return self.forward_blocks(self.prepend_cls(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> normalised tokens (B, [1 +] h*w, C)."""
        tokens, _ = self.patch_tokens(x)
        return self.forward_blocks(self.prepend_cls(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> feature map (B, C, H/16, W/16) (cls token dropped), what task heads take."""
        tokens, (h, w) = self.patch_tokens(x)
        out = self.forward_blocks(self.prepend_cls(tokens))[:, self.num_prefix_tokens :]
        return out.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Adapt a stored ``pos_embed`` of another layout before loading (strip cls row, resize grid)."""
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            # Tables saved next to a cls token (pretraining) carry a leading cls row.
            has_cls = prefix + "cls_token" in state_dict
            state_dict[key] = self.adapt_pos_embed(state_dict[key], has_cls)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapt_pos_embed(self, table: torch.Tensor, has_cls: bool) -> torch.Tensor:
        """Convert a (1, [1 +] L', C) table (cls row or not, any grid) to this model's layout.

        The source grid is inferred from L' (square, else this model's aspect ratio).
        """
        if table.ndim != 3 or table.shape[-1] != self.embed_dim:
            raise ValueError(
                f"pos_embed of shape {tuple(table.shape)} does not fit a model of width {self.embed_dim}"
            )
        grid = table[:, 1:] if has_cls else table
        grid = resize_pos_embed(grid, self.grid_size, old_hw=infer_grid(grid.shape[1], self.grid_size))
        if self.cls_token is not None:
            cls = table[:, :1] if has_cls else torch.zeros_like(grid[:, :1])
            grid = torch.cat([cls, grid], dim=1)
        return grid


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
