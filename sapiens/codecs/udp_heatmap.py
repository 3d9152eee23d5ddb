"""UDP Gaussian heatmap codec with DARK-UDP sub-pixel decoding (top-down 2D pose).

Coordinates follow Unbiased Data Processing (UDP, Huang et al. 2020): pixel centres sit on integer
coordinates and the first/last pixel centres of the input crop map onto the first/last heatmap
pixel centres, so ``x_heatmap = x_input / s`` with ``s = (input_size - 1) / (heatmap_size - 1)``.
Decoding inverts exactly that relation (``x_input = x_heatmap * s``), so encode -> decode is
unbiased; :func:`sapiens.data.topdown.crop_to_image` then maps crop pixels back to the image.
(mmpose decodes with ``input_size / (heatmap_size - 1)`` and undoes the extra factor in its
inverse box transform; the end-to-end image coordinates are identical.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["UDPHeatmap", "flip_heatmaps", "heatmap_argmax", "refine_dark_udp"]

ArrayLike = np.ndarray | torch.Tensor

# Added to the Hessian diagonal so a flat neighbourhood does not divide by zero.
EPS = float(np.finfo(np.float32).eps)


class UDPHeatmap:
    """Encode keypoints as UDP Gaussian heatmaps and decode heatmaps back to keypoints.

    Args:
        input_size: (W, H) of the network input crop, e.g. (768, 1024).
        heatmap_size: (w, h) of the heatmaps, e.g. (192, 256).
        sigma: Gaussian standard deviation in heatmap pixels (6 at 256x192; scale it with the
            heatmap size for smaller configs, e.g. 1.5 at 16x12).
        blur_kernel_size: odd Gaussian-blur kernel for DARK-UDP refinement (11 in Sapiens).
    """

    def __init__(
        self,
        input_size: Sequence[int],
        heatmap_size: Sequence[int],
        sigma: float = 6.0,
        blur_kernel_size: int = 11,
    ) -> None:
        if len(input_size) != 2 or len(heatmap_size) != 2:
            raise ValueError(
                f"input_size and heatmap_size must be (W, H) pairs, got {input_size}, {heatmap_size}"
            )
        if min(heatmap_size) < 2 or min(input_size) < 2:
            raise ValueError(f"sizes must be >= 2 pixels, got {input_size}, {heatmap_size}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        self.input_size = np.asarray(input_size, dtype=np.float32)
        self.heatmap_size = np.asarray(heatmap_size, dtype=np.int64)
        self.sigma = float(sigma)
        self.blur_kernel_size = int(blur_kernel_size)
        # UDP scale: distance between first and last pixel centres, input over heatmap.
        self.scale_factor = (self.input_size - 1.0) / (self.heatmap_size - 1.0).astype(np.float32)

    def encode(self, keypoints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Build Gaussian target heatmaps.

        Args:
            keypoints: float32 (K, 2) or (N, K, 2), (x, y) in input-crop pixels.
            visible: float32 (K,) or (N, K); > 0.5 means labelled (v=1 or 2 after ``v > 0``).

        Returns:
            heatmaps: float32 (K, h, w), peak 1 at each keypoint (max over the N instances).
            weights: float32 (K,) (or (N, K) for batched input): 0 where the keypoint is not
                labelled or its 3-sigma Gaussian window lies entirely outside the heatmap
                (a keypoint just outside the crop keeps a partial Gaussian and weight 1, as UDP
                does).
        """
        kpts = np.asarray(keypoints, dtype=np.float32)
        vis = np.asarray(visible, dtype=np.float32)
        single = kpts.ndim == 2
        if single:
            kpts, vis = kpts[None], vis[None]
        if kpts.ndim != 3 or kpts.shape[-1] != 2 or vis.shape != kpts.shape[:2]:
            raise ValueError(
                f"expected keypoints (N, K, 2) and visible (N, K), got {np.shape(keypoints)} "
                f"and {np.shape(visible)}"
            )
        w, h = (int(v) for v in self.heatmap_size)
        radius = 3.0 * self.sigma
        mu = kpts / self.scale_factor  # (N, K, 2) in heatmap pixels
        mu_round = np.floor(mu + 0.5)
        inside = (
            (mu_round[..., 0] - radius < w)
            & (mu_round[..., 1] - radius < h)
            & (mu_round[..., 0] + radius >= 0)
            & (mu_round[..., 1] + radius >= 0)
        )
        weights = ((vis > 0.5) & inside & np.isfinite(mu).all(-1)).astype(np.float32)
        mu = np.where(weights[..., None] > 0, mu, 0.0)
        mu_round = np.where(weights[..., None] > 0, mu_round, 0.0)

        # The Gaussian is separable, so build it as an outer product of 1-D profiles, each
        # truncated to the (2*radius+1)-wide window around the rounded centre.
        xs = np.arange(w, dtype=np.float32)
        ys = np.arange(h, dtype=np.float32)
        gx = np.exp(-((xs - mu[..., 0:1]) ** 2) / (2 * self.sigma**2))
        gx *= np.abs(xs - mu_round[..., 0:1]) <= radius
        gy = np.exp(-((ys - mu[..., 1:2]) ** 2) / (2 * self.sigma**2))
        gy *= np.abs(ys - mu_round[..., 1:2]) <= radius
        heatmaps = np.zeros((kpts.shape[1], h, w), dtype=np.float32)
        for n in range(kpts.shape[0]):  # N is small (1 in top-down); avoids an (N, K, h, w) copy
            hm = gy[n, :, :, None] * gx[n, :, None, :] * weights[n, :, None, None]
            np.maximum(heatmaps, hm, out=heatmaps)
        return heatmaps, (weights[0] if single else weights)

    def decode(self, heatmaps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Decode heatmaps to keypoints in input-crop pixel coordinates.

        Argmax, then DARK-UDP refinement (Gaussian blur, log, one Newton step), then UDP scaling
        ``x_input = x_heatmap * (input - 1) / (heatmap - 1)``. Torch inputs are processed on
        their own device (e.g. GPU), so only the (B, K, 2) result is copied to the host.

        Args:
            heatmaps: (B, K, h, w) or (K, h, w) numpy array or torch tensor (any float dtype).

        Returns:
            keypoints: float32 (B, K, 2) (or (K, 2)) in input-crop pixels.
            scores: float32 (B, K) (or (K,)), the heatmap maximum (<= 0 means no peak;
                such keypoints are left at the integer argmax).
        """
        hm = torch.as_tensor(heatmaps).detach().float()
        single = hm.ndim == 3
        if single:
            hm = hm[None]
        if hm.ndim != 4:
            raise ValueError(f"expected heatmaps (B, K, h, w), got shape {tuple(hm.shape)}")
        if tuple(hm.shape[-2:]) != (int(self.heatmap_size[1]), int(self.heatmap_size[0])):
            raise ValueError(
                f"heatmap size {tuple(hm.shape[-2:])} (h, w) does not match codec heatmap_size "
                f"(w, h) {tuple(int(v) for v in self.heatmap_size)}"
            )
        locs, scores = heatmap_argmax(hm)
        locs = refine_dark_udp(locs, hm, self.blur_kernel_size)
        scale = torch.as_tensor(self.scale_factor, device=locs.device)
        keypoints = (locs * scale).cpu().numpy().astype(np.float32)
        scores = scores.cpu().numpy().astype(np.float32)
        if single:
            return keypoints[0], scores[0]
        return keypoints, scores


def heatmap_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer peak location and value per channel.

    Args:
        heatmaps: float32 (B, K, h, w).

    Returns:
        locs: float32 (B, K, 2) (x, y) of the maximum; scores: float32 (B, K) the maximum.
    """
    w = heatmaps.shape[-1]
    scores, idx = heatmaps.flatten(2).max(dim=-1)
    locs = torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], dim=-1)
    return locs.float(), scores


def _gaussian_blur_keep_max(heatmaps: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-padded separable Gaussian blur of every (h, w) map, rescaled to its original max.

    The kernel is OpenCV's default for the size (sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8).

    Args:
        heatmaps: float32 (B, K, h, w). Returns the same shape.
    """
    b, k, h, w = heatmaps.shape
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    t = torch.arange(kernel_size, device=heatmaps.device, dtype=torch.float32) - kernel_size // 2
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # Channels as groups of a depthwise conv: much faster on CPU than a (B*K, 1) batch.
    n = b * k
    maps = heatmaps.reshape(1, n, h, w)
    pad = kernel_size // 2
    kv = kernel.view(1, 1, -1, 1).expand(n, 1, kernel_size, 1)
    kh = kernel.view(1, 1, 1, -1).expand(n, 1, 1, kernel_size)
    blurred = F.conv2d(maps, kv, padding=(pad, 0), groups=n)
    blurred = F.conv2d(blurred, kh, padding=(0, pad), groups=n)
    orig_max = maps.amax(dim=(-2, -1), keepdim=True)
    new_max = blurred.amax(dim=(-2, -1), keepdim=True)
    ratio = torch.where(new_max > 0, orig_max / new_max.clamp_min(1e-12), torch.zeros_like(new_max))
    return (blurred * ratio).reshape(b, k, h, w)


def refine_dark_udp(locs: torch.Tensor, heatmaps: torch.Tensor, blur_kernel_size: int = 11) -> torch.Tensor:
    """DARK-UDP sub-pixel refinement: one Newton step on the log of the blurred heatmap.

    The peak of a Gaussian is where the gradient of its log vanishes; a second-order Taylor
    expansion at the integer argmax gives the offset ``-H^-1 g`` with central differences for
    the gradient g and Hessian H (edge-padded so border peaks stay defined).

    Args:
        locs: float32 (B, K, 2) integer (x, y) argmax locations.
        heatmaps: float32 (B, K, h, w) raw heatmaps.
        blur_kernel_size: odd kernel size of the smoothing blur.

    Returns:
        float32 (B, K, 2) refined (x, y) in heatmap pixels.
    """
    b, k, h, w = heatmaps.shape
    blurred = _gaussian_blur_keep_max(heatmaps, blur_kernel_size)
    log_hm = torch.log(blurred.clamp(1e-3, 50.0))
    pad = F.pad(log_hm.reshape(b * k, 1, h, w), (1, 1, 1, 1), mode="replicate")
    pad = pad.reshape(b * k, (h + 2) * (w + 2))
    x = locs[..., 0].long().clamp(0, w - 1).reshape(-1, 1) + 1
    y = locs[..., 1].long().clamp(0, h - 1).reshape(-1, 1) + 1

    def at(dx: int, dy: int) -> torch.Tensor:
        return pad.gather(1, (y + dy) * (w + 2) + (x + dx))[:, 0]

    c = at(0, 0)
    gx = 0.5 * (at(1, 0) - at(-1, 0))
    gy = 0.5 * (at(0, 1) - at(0, -1))
    hxx = at(1, 0) - 2 * c + at(-1, 0) + EPS
    hyy = at(0, 1) - 2 * c + at(0, -1) + EPS
    hxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * c - at(-1, 0) - at(0, -1) + at(-1, -1))
    det = hxx * hyy - hxy * hxy
    # step = H^-1 g with the closed-form 2x2 inverse
    step = torch.stack([hyy * gx - hxy * gy, hxx * gy - hxy * gx], dim=-1) / det[:, None]
    step = step.reshape(b, k, 2)
    refined = locs - step
    # The step is applied whatever its size, as mmpose does (on noisy peaks it can exceed a
    # heatmap pixel; dropping such steps moved keypoints ~0.5 px away from the published decoding).
    # Only a non-finite step (a singular Hessian on an exactly flat map) keeps the integer argmax.
    ok = torch.isfinite(refined).all(-1)
    return torch.where(ok[..., None], refined, locs)


def flip_heatmaps(heatmaps: ArrayLike, flip_index: Sequence[int] | np.ndarray) -> ArrayLike:
    """Mirror heatmaps horizontally and swap left/right channels (flip test, no shift).

    Under UDP a horizontal flip maps heatmap column ``x`` to ``w - 1 - x`` exactly, so no
    one-pixel shift is needed.

    Args:
        heatmaps: (B, K, h, w) numpy array or torch tensor.
        flip_index: (K,) index of each keypoint's mirror (``KeypointSet.flip_index``).

    Returns:
        Same type and shape as ``heatmaps``.
    """
    if heatmaps.ndim != 4 or heatmaps.shape[1] != len(flip_index):
        raise ValueError(
            f"expected heatmaps (B, K={len(flip_index)}, h, w), got shape {tuple(heatmaps.shape)}"
        )
    if isinstance(heatmaps, torch.Tensor):
        index = torch.as_tensor(np.asarray(flip_index), dtype=torch.long, device=heatmaps.device)
        return torch.flip(heatmaps, dims=[-1]).index_select(1, index)
    return np.ascontiguousarray(np.asarray(heatmaps)[:, np.asarray(flip_index), :, ::-1])
