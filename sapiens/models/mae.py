"""Masked autoencoder (MAE) pretraining around the Sapiens ViT encoder.

Per sample, a random subset of patches (``mask_ratio``, default 0.75) is hidden by argsorting uniform noise;
the encoder runs on the visible tokens only, a light decoder (512 wide, 8 deep, 16 heads, own fixed sin-cos
table, learnable mask token) reconstructs every patch, and the loss is the MSE to per-patch normalised pixels
on the masked patches only.

Shapes below: B batch, L = h*w patches, p patch size, D encoder width, Dd decoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens.models.pos_embed import sincos_2d
from sapiens.models.vit import LN_EPS, Block, VisionTransformer, _init_module


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, L, p*p*3), patches in raster order, pixels ordered (row, col, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, p*p*3) -> (B, 3, h*p, w*p); inverse of :func:`patchify`."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h * p, w * p)


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` share of tokens per sample.

    Args:
        tokens: (B, L, D).
        mask_ratio: share of tokens removed, in [0, 1).

    Returns:
        kept (B, K, D) with K = int(L * (1 - mask_ratio)), at least 1;
        mask (B, L) float, 1 = removed, in the original order;
        ids_restore (B, L) long, the permutation that puts shuffled tokens back in order.
    """
    b, length, d = tokens.shape
    keep = max(1, int(length * (1 - mask_ratio)))
    noise = torch.rand(b, length, device=tokens.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, length, device=tokens.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MAEDecoder(nn.Module):
    """Lightweight transformer decoder that predicts the pixels of every patch."""

    def __init__(
        self,
        encoder_dim: int,
        patch_size: int,
        grid: tuple[int, int],
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.grid_size = tuple(grid)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * in_chans)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fixed sin-cos table, N(0, 0.02) mask token, xavier Linear."""
        if self.mask_token.device.type == "meta":
            return
        self.decoder_pos_embed.copy_(sincos_2d(self.grid_size, self.mask_token.shape[-1], True))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_module)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """latent: (B, 1+K, D) encoder output with cls; ids_restore: (B, L); pos: (1, 1+L, Dd).

        Returns (B, L, p*p*3) pixel predictions for every patch (cls dropped).
        """
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        seq = torch.cat([x[:, 1:], masked], dim=1)
        seq = seq.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], seq], dim=1) + pos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class MaskedAutoencoder(nn.Module):
    """MAE = a :class:`VisionTransformer` encoder with cls token + :class:`MAEDecoder`.

    Args:
        encoder: the backbone (``pos_embed="sincos"``, ``cls_token=True``).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (published: 512 / 8 / 16).
        mask_ratio: share of patches hidden per sample (0.75 published; 0.95 works).
        norm_pix_loss: regress per-patch normalised pixels (mean/var per patch, eps 1e-6).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if encoder.cls_token is None:
            raise ValueError("MAE pretraining needs an encoder built with cls_token=True")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            encoder.patch_size,
            encoder.grid_size,
            decoder_dim,
            decoder_depth,
            decoder_heads,
        )
        self.decoder.init_weights()
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    def no_weight_decay(self) -> set[str]:
        """Names without weight decay (besides biases and norms)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {
            "decoder.mask_token",
            "decoder.decoder_pos_embed",
        }

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ):
        """imgs: (B, 3, H, W) -> latent (B, 1+K, D), mask (B, L), ids_restore (B, L), grid (h, w)."""
        tokens, grid = self.encoder.patch_tokens(imgs)
        kept, mask, ids_restore = random_masking(tokens, mask_ratio, generator)
        latent = self.encoder.forward_blocks(self.encoder.prepend_cls(kept))
        return latent, mask, ids_restore, grid

    def decoder_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder table (1, 1+L, Dd) for ``grid`` (rebuilt when the run-time grid differs)."""
        if tuple(grid) == self.decoder.grid_size:
            return self.decoder.decoder_pos_embed
        table = sincos_2d(grid, self.decoder.decoder_pos_embed.shape[-1], cls_token=True)
        return table.to(self.decoder.decoder_pos_embed)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, p*p*3): patches, normalised per patch when ``norm_pix_loss``."""
        target = patchify(imgs, self.encoder.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE. pred: (B, L, p*p*3), mask: (B, L)."""
        per_patch = (pred.float() - self.target(imgs).float()).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ):
        """imgs: (B, 3, H, W) with H, W divisible by the patch size.

        Returns loss (scalar), pred (B, L, p*p*3), mask (B, L) with 1 = masked.
        """
        p = self.encoder.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by patch {p}")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, ratio, generator)
        pred = self.decoder(latent, ids_restore, self.decoder_pos(grid))
        return self.loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Images for display, all (B, 3, H, W) in the input's normalised space.

        Returns (masked input, reconstruction with visible patches pasted back). With ``norm_pix_loss``
        the predicted patches are de-normalised with the true patch mean/var (the usual MAE display trick).
        """
        p = self.encoder.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        patches = patchify(imgs, p)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(patches * (1 - m), p, grid)
        recon = unpatchify(patches * (1 - m) + pred * m, p, grid)
        return masked, recon
