"""The window tokenizer of the Sapiens2 4K models (reference sapiens2.md section 1, "4K tokenizer").

A 4096x3072 image gives 256x192 patch tokens; the tokenizer cuts them into non-overlapping 4x4 windows,
prepends a learned window cls token ``w_cls``, adds a learned local position table ``local_pos_embed``
(1, 17, D), runs N multi-head blocks (no qk-norm, no layer scale, SwiGLU 4D, RMSNorm) and keeps each window's
cls output as its token. The trunk then sees 64x48 tokens, as many as at 1K. Windows go through the blocks in
chunks (1024 published) to bound the activation memory.

Parameter counts (derived, no final norm): 16 D^2 + 15 D per block + 18 D, which reproduces the reference's
151.11 M for the 1B model's 4 blocks exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens.models.sapiens2 import Sapiens2Block


class WindowTokenizer(nn.Module):
    """Pool each ``window x window`` patch window into one token.

    Args:
        dim: model width D; num_heads: heads of the tokenizer blocks (multi-head, no GQA).
        depth: tokenizer blocks (published 2 / 2 / 3 / 4 / 6 for 0.1b / 0.4b / 0.8b / 1b / 5b).
        window: window side in patches (4). mlp_ratio, qkv_bias: block shape.
        chunk: windows per forward chunk (1024).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int,
        window: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        chunk: int = 1024,
    ):
        super().__init__()
        self.window, self.chunk = window, chunk
        self.w_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.local_pos_embed = nn.Parameter(torch.zeros(1, 1 + window * window, dim))
        self.blocks = nn.ModuleList(
            Sapiens2Block(dim, num_heads, num_heads, mlp_ratio, qkv_bias, qk_norm=False, layer_scale=None)
            for _ in range(depth)
        )

    @torch.no_grad()
    def init_tokens(self) -> None:
        """trunc-normal(0.02) window cls token and local position table."""
        nn.init.trunc_normal_(self.w_cls, std=0.02)
        nn.init.trunc_normal_(self.local_pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """tokens (B, h*w, D) of the patch grid (h, w) -> (B, (h/s)*(w/s), D) and the grid (h/s, w/s)."""
        b, _, d = tokens.shape
        h, w, s = grid[0], grid[1], self.window
        if h % s or w % s:
            raise ValueError(f"patch grid {grid} is not divisible by the tokenizer window {s}")
        windows = tokens.reshape(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(b * (h // s) * (w // s), s * s, d)
        cls = self.w_cls.expand(windows.shape[0], -1, -1).to(windows.dtype)
        x = torch.cat([cls, windows], dim=1) + self.local_pos_embed.to(windows.dtype)
        pooled = []
        for part in x.split(self.chunk):
            for block in self.blocks:
                part = block(part)
            pooled.append(part[:, 0])
        out = torch.cat(pooled).reshape(b, (h // s) * (w // s), d)
        return out, (h // s, w // s)
