"""Analytic model FLOPs of the benchmarked training steps (per image).

FLOPs are counted analytically as *model* FLOPs (what the maths needs; recomputation under
activation checkpointing is not counted, as in the usual MFU definition), matmuls and convs only:

    block(N, d)   = N (4 + 2r) d^2 + 2 N^2 d       multiply-adds of one ViT block on N tokens of
                                                   width d (qkv 3d^2, proj d^2, MLP 2 r d^2 per token,
                                                   q k^T and attn v: N^2 d each)
    MAE forward   = L 3p^2 D                       patch embed (all L patches, before masking)
                  + depth  * block(K + 1, D)       encoder on the K = int(L (1 - mask)) visible
                                                   tokens + cls
                  + (K + 1) D Dd                   decoder embed
                  + ddepth * block(L + 1, Dd)      decoder on all tokens + cls
                  + (L + 1) Dd 3p^2                pixel prediction
    pose forward  = T 3p^2 D + depth * block(T, D) + head (deconv k4 s2: h_in w_in C_in C_out 16;
                                                   1x1 conv: h w C_in C_out; final: h w C K)
    step FLOPs    = 3 x 2 x forward multiply-adds  (backward = 2 x forward)
"""

from __future__ import annotations

POSE_PATCH_PADDING = 2  # published pose backbones pad the patch conv by 2 (grid unchanged)


def block_macs(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Multiply-adds of one transformer block on ``tokens`` tokens of width ``dim``."""
    return int(tokens * (4 + 2 * mlp_ratio) * dim * dim + 2 * tokens * tokens * dim)


def mae_forward_macs(
    shape: dict, height: int, width: int, mask_ratio: float, decoder: tuple[int, int, int]
) -> int:
    """Forward multiply-adds of :class:`MaskedAutoencoder` for ONE image (formula in the docstring).

    Args:
        shape: backbone dict (embed_dim, depth, patch_size, mlp_ratio).
        decoder: (dim, depth, heads) of the MAE decoder.
    """
    p, d, r = shape.get("patch_size", 16), shape["embed_dim"], shape.get("mlp_ratio", 4.0)
    patches = (height // p) * (width // p)
    kept = max(1, int(patches * (1 - mask_ratio)))
    dd, ddepth = decoder[0], decoder[1]
    return (
        patches * 3 * p * p * d
        + shape["depth"] * block_macs(kept + 1, d, r)
        + (kept + 1) * d * dd
        + ddepth * block_macs(patches + 1, dd, 4.0)
        + (patches + 1) * dd * 3 * p * p
    )


def pose_forward_macs(
    shape: dict, height: int, width: int, keypoints: int, deconv: list[int], conv: list[int]
) -> int:
    """Forward multiply-adds of backbone + ``HeatmapHead`` for ONE image (no cls token)."""
    p, d, r = shape.get("patch_size", 16), shape["embed_dim"], shape.get("mlp_ratio", 4.0)
    h = (height + 2 * POSE_PATCH_PADDING - p) // p + 1
    w = (width + 2 * POSE_PATCH_PADDING - p) // p + 1
    macs = h * w * 3 * p * p * d + shape["depth"] * block_macs(h * w, d, r)
    channels = d
    for out in deconv:
        macs += h * w * channels * out * 16
        h, w, channels = 2 * h, 2 * w, out
    for out in conv:
        macs += h * w * channels * out
        channels = out
    return macs + h * w * channels * keypoints
