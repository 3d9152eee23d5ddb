"""A plain eager MAE built from PyTorch's own layers: the yardstick for this project's MAE step.

Same maths and shapes as :class:`sapiens.models.mae.MaskedAutoencoder`: patch-embed conv, position
tables (learned here, fixed sin-cos in ours: one add either way), pre-norm blocks with GELU MLPs,
random masking by argsorted noise, a light decoder, normalised-pixel loss on masked patches. Written
the way a first implementation would be: ``nn.TransformerEncoderLayer(norm_first=True)`` blocks and no
project code. ``pretrain_throughput --reference`` times one step of each and prints the ratio.
"""

from __future__ import annotations

import torch
from torch import nn


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


class ReferenceMAE(nn.Module):
    """images (B, 3, H, W) -> MAE loss; ``mask_ratio`` of the patches hidden per sample."""

    def __init__(
        self, image_size, patch, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads, mask_ratio
    ):
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        tokens = (image_size[0] // patch) * (image_size[1] // patch)
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _blocks(dim, depth, heads, 4.0)
        self.to_decoder = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, tokens + 1, decoder_dim))
        self.decoder = _blocks(decoder_dim, decoder_depth, decoder_heads, 4.0)
        self.to_pixels = nn.Linear(decoder_dim, patch * patch * 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, p = images.shape[0], self.patch
        x = self.embed(images).flatten(2).transpose(1, 2) + self.pos  # (B, L, D)
        length = x.shape[1]
        keep = max(1, int(length * (1 - self.mask_ratio)))
        order = torch.rand(b, length, device=x.device).argsort(1)
        restore = order.argsort(1)
        kept = x.gather(1, order[:, :keep, None].expand(-1, -1, x.shape[-1]))
        latent = self.encoder(torch.cat([self.cls.expand(b, -1, -1), kept], 1))
        y = self.to_decoder(latent)
        full = torch.cat([y[:, 1:], self.mask_token.expand(b, length - keep, -1)], 1)
        full = full.gather(1, restore[..., None].expand(-1, -1, y.shape[-1]))
        pred = self.to_pixels(self.decoder(torch.cat([y[:, :1], full], 1) + self.decoder_pos))[:, 1:]
        h, w = images.shape[-2] // p, images.shape[-1] // p
        target = images.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        return (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()
