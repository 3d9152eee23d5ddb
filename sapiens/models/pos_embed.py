"""Position embeddings: fixed 2D sin-cos tables (pretraining) and bicubic resizing (fine-tuning).

Sapiens pretrains with a frozen 2D sin-cos table on a 64x64 grid plus a zero row for the cls token, then
fine-tunes with a learnable table on the 64x48 grid of a 1024x768 input. Moving between the two means
stripping the cls row and resizing the grid bicubically, in fp32, with ``align_corners=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d(grid_hw: tuple[int, int], dim: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding.

    The channel order is ``[sin(w), cos(w), sin(h), cos(h)]``, each a quarter of ``dim``, with frequencies
    ``1 / 10000^(k / (dim/4))``: the layout of the published Sapiens/MAE tables, so loaded and freshly
    built tables agree.

    Args:
        grid_hw: patch grid (rows, cols).
        dim: embedding width, divisible by 4.
        cls_token: prepend an all-zero row for the cls token.

    Returns:
        (1, rows*cols [+1], dim) float32 tensor, rows in raster order (row-major).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid_hw
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    hh, ww = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    out_w = ww.reshape(-1, 1) * omega[None]  # (L, dim/4)
    out_h = hh.reshape(-1, 1) * omega[None]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table.unsqueeze(0)


def infer_grid(num_tokens: int, target_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """Guess the (rows, cols) grid of a flattened table with ``num_tokens`` patch tokens (no cls row).

    A square grid is assumed when possible (pretraining tables); otherwise the aspect ratio of
    ``target_hw`` is used (e.g. 3072 tokens with target 64x48 -> 64x48).
    """
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    if target_hw is not None:
        rows, cols = target_hw
        scale = math.sqrt(num_tokens / (rows * cols))
        guess = (round(rows * scale), round(cols * scale))
        if guess[0] * guess[1] == num_tokens:
            return guess
    raise ValueError(
        f"cannot infer the patch grid of a position embedding with {num_tokens} tokens; "
        "pass its grid explicitly"
    )


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_hw: tuple[int, int],
    old_hw: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    keep_prefix: bool = False,
) -> torch.Tensor:
    """Resize a flattened position-embedding table to a new patch grid with bicubic interpolation.

    Args:
        pos_embed: (1, P + L, C) table; the first ``num_prefix_tokens`` rows (cls) are not spatial.
        new_hw: target grid (rows, cols).
        old_hw: source grid; inferred from L (square first, else the aspect of ``new_hw``) when None.
        num_prefix_tokens: leading non-spatial rows (1 for a cls token).
        keep_prefix: keep those rows in front of the result (else they are dropped).

    Returns:
        (1, [P +] new_rows*new_cols, C) table in the input dtype; interpolation runs in fp32.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_hw is None:
        old_hw = infer_grid(grid.shape[1], new_hw)
    if old_hw[0] * old_hw[1] != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} tokens, not a {old_hw} grid")
    if tuple(old_hw) != tuple(new_hw):
        dtype, dim = grid.dtype, grid.shape[-1]
        img = grid.float().reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=tuple(new_hw), mode="bicubic", align_corners=False)
        grid = img.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if keep_prefix else grid
