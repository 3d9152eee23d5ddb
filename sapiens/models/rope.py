"""2D axial rotary position embedding (RoPE) of the Sapiens2 backbone.

Facts (reference sapiens2.md section 1, the DINOv3-style ``RopePositionEmbedding``):

- ``periods[k] = base ** (2k / (head_dim / 2))`` for ``k < head_dim / 4``, base 100; a persistent buffer, so
  checkpoints carry it as ``rope_embed.periods``.
- Patch (i, j) of an h x w grid sits at its centre, normalised per axis ("separate"):
  ``((i + 0.5) / h, (j + 0.5) / w)``, then mapped to [-1, 1].
- ``angles = 2 pi coord / period`` -> (h w, 2, head_dim / 4), flattened to [row angles, column angles]
  (head_dim / 2) and tiled twice to head_dim.
- Rotation "rotate half" style: ``x cos + rotate_half(x) sin`` (channel i pairs with i + head_dim / 2).
- Published default: everything (coordinates, angles, sin / cos and the rotation of q and k) in **bf16**,
  q and k cast back afterwards. ``dtype="fp32"`` computes in float32 instead.

For runtimes without bf16 arithmetic (onnxruntime on CPU has no bf16 Mul / Sin), :func:`bf16_as_float32`
computes the bf16 path in float32 ops with every intermediate rounded to bf16: the same values as bf16
arithmetic (a product of two bf16 numbers is exact in float32), traced by the exporters as float32 ops and
casts.

Because coordinates are normalised by the grid size, a model run on another grid sees the same angles for the
same relative image position (positions scale with the image, they are not re-indexed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

ROPE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_EMULATION = {"bf16": False}  # set by bf16_as_float32()


@contextlib.contextmanager
def bf16_as_float32() -> Iterator[None]:
    """Inside: bf16 RoPE tables and rotations run as float32 ops rounded to bf16 after each step (same
    values; for graph export to runtimes without bf16 kernels). Not thread-safe; export only."""
    _EMULATION["bf16"] = True
    try:
        yield
    finally:
        _EMULATION["bf16"] = False


def _rounder(emulate: bool):
    """Identity, or x -> x rounded to bf16 and back (emulated bf16 arithmetic)."""
    return (lambda t: t.to(torch.bfloat16).float()) if emulate else (lambda t: t)


class RopePositionEmbedding(nn.Module):
    """sin / cos tables of a patch grid for 2D axial RoPE.

    Args:
        head_dim: attention head width, divisible by 4.
        base: period base (published 100).
        dtype: ``"bf16"`` (published) or ``"fp32"``: the precision of the tables and of the rotation.
    """

    def __init__(self, head_dim: int, base: float = 100.0, dtype: str = "bf16"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
        if dtype not in ROPE_DTYPES:
            raise ValueError(f"rope dtype must be one of {sorted(ROPE_DTYPES)}, got {dtype!r}")
        self.head_dim = head_dim
        self.base = base
        self.dtype = ROPE_DTYPES[dtype]
        self.register_buffer("periods", self.default_periods(), persistent=True)

    def default_periods(self) -> torch.Tensor:
        """(head_dim / 4,) float32 periods ``base ** (2k / (head_dim / 2))``."""
        exponent = 2 * torch.arange(self.head_dim // 4, dtype=torch.float64) / (self.head_dim // 2)
        return (self.base**exponent).float()

    def reset_parameters(self) -> None:
        """Recompute the periods (after building on the meta device and materialising)."""
        with torch.no_grad():
            self.periods.copy_(self.default_periods())

    def forward(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos tables of an (h, w) grid: each (h*w, head_dim) in the rope dtype, raster order."""
        h, w = grid
        emulate = _EMULATION["bf16"] and self.dtype == torch.bfloat16
        dt, dev, r = (torch.float32 if emulate else self.dtype), self.periods.device, _rounder(emulate)
        rows = r(r(torch.arange(h, device=dev, dtype=dt) + 0.5) / h)
        cols = r(r(torch.arange(w, device=dev, dtype=dt) + 0.5) / w)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)  # (hw, 2)
        coords = r(r(2.0 * coords) - 1.0)
        periods = r(self.periods.to(dt))
        angles = r(r(2 * math.pi * coords[:, :, None]) / periods[None, None, :])  # (hw, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)  # (hw, hd)
        return r(angles.sin()), r(angles.cos())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): ``[-x2, x1]`` for the halves ``x1, x2`` of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of ``x`` by their positions; the ``num_prefix`` leading tokens stay as is.

    Args:
        x: (B, heads, P + N, head_dim) queries or keys.
        sin, cos: (N, head_dim) for tokens in grid order, or (B, N, head_dim) per sample (kept tokens of a
            masked image); their dtype is the precision of the rotation (bf16 published).
        num_prefix: P, the cls + register tokens in front.

    Returns:
        x's shape and dtype.
    """
    if sin.ndim == 3:  # per-sample positions: broadcast over heads
        sin, cos = sin[:, None], cos[:, None]
    prefix, patches = x[:, :, :num_prefix], x[:, :, num_prefix:]
    dtype = patches.dtype
    r = _rounder(_EMULATION["bf16"])  # tables made under bf16_as_float32: float32 holding bf16 values
    patches = r(patches.to(sin.dtype))
    patches = r(r(patches * cos) + r(rotate_half(patches) * sin)).to(dtype)
    return torch.cat([prefix, patches], dim=2)
