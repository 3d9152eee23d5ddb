"""Masked autoencoder (MAE) pretraining around any backbone family (Sapiens ViT, Sapiens2).

Per sample, a random subset of patches (``mask_ratio``, default 0.75) is hidden by argsorting uniform noise;
the encoder runs on the visible tokens only, a light decoder (512 wide, 8 deep, 16 heads, own fixed sin-cos
table, learnable mask token) reconstructs every patch, and the loss is the MSE to per-patch normalised pixels
on the masked patches only.

The encoder is used only through the backbone API (``sapiens.models.factory``): ``embed`` gives the patch
tokens, the kept ones are gathered, and ``encode(kept, grid, ids_keep)`` runs them with the family's prefix
tokens (the ViT's cls; Sapiens2's cls + 8 registers, which take part in attention) and positions (Sapiens2's
kept tokens rotate by their own RoPE angles). The decoder sees every prefix token plus the restored sequence.

Shapes below: B batch, L = h*w patches, p patch size, P prefix tokens, D encoder width, Dd decoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens.models.pos_embed import sincos_2d
from sapiens.models.vit import LN_EPS, Block, _init_module


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


def masking_ids(
    batch: int,
    length: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw which tokens each sample keeps: a random ``1 - mask_ratio`` share.

    ``noise`` (B, L) in [0, 1), when given, replaces the uniform draw from ``generator`` (a caller that
    seeds every sample on its own, e.g. for masks that do not depend on how a batch is split over ranks).

    Returns:
        ids_keep (B, K) long raster indices of the kept tokens, K = int(L * (1 - mask_ratio)), at least 1;
        mask (B, L) float, 1 = removed, in the original order;
        ids_restore (B, L) long, the permutation that puts [kept, removed] tokens back in order.
    """
    keep = max(1, int(length * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D), ids (B, K) -> (B, K, D)."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` share of tokens per sample (:func:`masking_ids` + gather).

    Args:
        tokens: (B, L, D).
        mask_ratio: share of tokens removed, in [0, 1).

    Returns:
        kept (B, K, D) with K = int(L * (1 - mask_ratio)), at least 1;
        mask (B, L) float, 1 = removed, in the original order;
        ids_restore (B, L) long, the permutation that puts shuffled tokens back in order.
    """
    ids_keep, mask, ids_restore = masking_ids(*tokens.shape[:2], mask_ratio, tokens.device, generator)
    return gather_tokens(tokens, ids_keep), mask, ids_restore


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

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor, num_prefix: int = 1
    ) -> torch.Tensor:
        """latent: (B, P+K, D) encoder output, P prefix tokens first; ids_restore: (B, L); pos: (1, 1+L, Dd).

        Prefix tokens get the table's (zero) cls row, patches their grid rows. Returns (B, L, p*p*3) pixel
        predictions for every patch (prefix dropped).
        """
        return self.predict_pixels(self.hidden(latent, ids_restore, pos, num_prefix), num_prefix)

    def predict_pixels(self, hidden: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
        """hidden (B, P+L, Dd) from :meth:`hidden` -> (B, L, p*p*3) pixel predictions (prefix dropped)."""
        return self.decoder_pred(hidden)[:, num_prefix:]

    def hidden(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor, num_prefix: int = 1
    ) -> torch.Tensor:
        """The decoder's normalised last hidden states (B, P+L, Dd), every patch in raster order (masked
        ones filled in from the mask token), prefix first; what :meth:`forward` predicts pixels from and
        what other objectives (the dense self-distillation loss) can read at the masked positions."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        prefix, kept = x[:, :num_prefix], x[:, num_prefix:]
        masked = self.mask_token.expand(b, length - kept.shape[1], -1)
        seq = gather_tokens(torch.cat([kept, masked], dim=1), ids_restore)
        x = torch.cat([prefix + pos[:, :1], seq + pos[:, 1:]], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)


class MaskedAutoencoder(nn.Module):
    """MAE = an encoder with the backbone API and a cls token + :class:`MAEDecoder`.

    Args:
        encoder: the backbone (ViT: ``pos_embed="sincos"``, ``cls_token=True``; or Sapiens2).
        decoder_dim, decoder_depth, decoder_heads: decoder shape (published: 512 / 8 / 16).
        mask_ratio: share of patches hidden per sample (0.75 published; 0.95 works).
        norm_pix_loss: regress per-patch normalised pixels (mean/var per patch, eps 1e-6).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if encoder.num_prefix_tokens < 1:
            raise ValueError("MAE pretraining needs an encoder with a cls token (ViT: cls_token=True)")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        # Pixels per token side: the patch size, or the 4K tokenizer's window (Sapiens2 feature_stride).
        self.patch_size = int(getattr(encoder, "feature_stride", encoder.patch_size))
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            self.patch_size,
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
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ):
        """imgs: (B, 3, H, W) -> latent (B, P+K, D), mask (B, L), ids_restore (B, L), grid (h, w).

        ``noise`` (B, L): optional per-patch uniform draws that pick the mask (see :func:`masking_ids`)."""
        tokens, grid = self.encoder.embed(imgs)
        ids_keep, mask, ids_restore = masking_ids(
            *tokens.shape[:2], mask_ratio, tokens.device, generator, noise
        )
        latent = self.encoder.encode(gather_tokens(tokens, ids_keep), grid, ids_keep)
        return latent, mask, ids_restore, grid

    def decoder_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder table (1, 1+L, Dd) for ``grid`` (rebuilt when the run-time grid differs)."""
        if tuple(grid) == self.decoder.grid_size:
            return self.decoder.decoder_pos_embed
        table = sincos_2d(grid, self.decoder.decoder_pos_embed.shape[-1], cls_token=True)
        return table.to(self.decoder.decoder_pos_embed)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, p*p*3): patches, normalised per patch when ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
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
        p = self.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by patch {p}")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, ratio, generator)
        pred = self.decoder(latent, ids_restore, self.decoder_pos(grid), self.encoder.num_prefix_tokens)
        return self.loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Images for display, all (B, 3, H, W) in the input's normalised space.

        Returns (masked input, reconstruction with visible patches pasted back). With ``norm_pix_loss``
        the predicted patches are de-normalised with the true patch mean/var (the usual MAE display trick).
        """
        p = self.patch_size
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
