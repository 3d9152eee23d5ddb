"""UDP heatmap codec: encode/decode round trip, flip consistency, weights."""

import cv2
import numpy as np
import pytest
import torch

from sapiens.codecs.udp_heatmap import UDPHeatmap, flip_heatmaps
from sapiens.data.topdown import (
    bbox_xywh_to_center_scale,
    crop_to_image,
    transform_points,
    udp_affine_matrix,
)
from sapiens.labels import load_keypoint_set
from sapiens.metrics.keypoint_ap import KeypointAP

INPUT_WH = (192, 256)
HEATMAP_WH = (48, 64)
SIGMA = 2.0


def _interior_points(rng, n, k, margin=0.1):
    w, h = INPUT_WH
    lo = np.array([margin * (w - 1), margin * (h - 1)])
    hi = np.array([(1 - margin) * (w - 1), (1 - margin) * (h - 1)])
    return rng.uniform(lo, hi, size=(n, k, 2)).astype(np.float32)


def test_encode_peak_and_shapes():
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, SIGMA)
    kpts = np.array([[0.0, 0.0], [191.0, 255.0], [100.0, 60.0]], np.float32)
    heatmaps, weights = codec.encode(kpts, np.ones(3, np.float32))
    assert heatmaps.shape == (3, 64, 48) and heatmaps.dtype == np.float32
    assert weights.shape == (3,)
    # UDP maps the first/last input pixel centres exactly onto the first/last heatmap pixels.
    assert heatmaps[0, 0, 0] == pytest.approx(1.0) and heatmaps[1, 63, 47] == pytest.approx(1.0)
    assert heatmaps.max() <= 1.0 + 1e-6


def test_weights_zero_for_invisible_or_far_outside():
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, SIGMA)
    kpts = np.array([[50, 50], [50, 50], [-400, 50], [50, 2000], [-2.0, 30]], np.float32)
    vis = np.array([1, 0, 1, 1, 1], np.float32)
    heatmaps, weights = codec.encode(kpts, vis)
    np.testing.assert_array_equal(weights, [1, 0, 0, 0, 1])
    assert np.all(heatmaps[1:4] == 0)
    # batched input: weights per instance, heatmaps merged with max
    hb, wb = codec.encode(np.stack([kpts, kpts + 10]), np.stack([vis, vis]))
    assert wb.shape == (2, 5) and hb.shape == (5, 64, 48)
    np.testing.assert_array_less(heatmaps - 1e-6, hb)


def test_roundtrip_subpixel_and_oks_ap():
    rng = np.random.default_rng(0)
    kset = load_keypoint_set("coco17")
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, SIGMA)
    metric = KeypointAP(kset, nms_thr=None)
    n_img, k = 12, kset.num_keypoints
    all_errors = []
    for image_id in range(n_img):
        # A person box in a 640x480 image; GT keypoints inside the padded crop region.
        box = np.array(
            [
                rng.uniform(50, 300),
                rng.uniform(20, 150),
                rng.uniform(80, 200),
                rng.uniform(150, 300),
            ],
            np.float32,
        )
        center, scale = bbox_xywh_to_center_scale(box, INPUT_WH[0] / INPUT_WH[1])
        crop_pts = _interior_points(rng, 1, k)[0]
        matrix = udp_affine_matrix(center, scale, 0.0, INPUT_WH)
        image_pts = crop_to_image(crop_pts, center, scale, INPUT_WH)
        np.testing.assert_allclose(transform_points(image_pts, matrix), crop_pts, atol=1e-3)
        vis = np.full(k, 2.0, np.float32)
        vis[rng.integers(0, k)] = 0  # one unlabelled keypoint per person
        gt = np.concatenate([image_pts, vis[:, None]], 1)
        metric.add_ground_truth(
            {
                "image_id": image_id,
                "width": 640,
                "height": 480,
                "persons": [{"bbox": box, "area": float(box[2] * box[3] * 0.6), "keypoints": gt}],
            }
        )
        heatmaps, weights = codec.encode(crop_pts, (vis > 0).astype(np.float32))
        decoded, scores = codec.decode(heatmaps[None])
        all_errors.append(np.abs(decoded[0] - crop_pts)[vis > 0])
        assert np.all(scores[0][vis > 0] > 0.9) and np.all(scores[0][vis == 0] == 0)
        pred = crop_to_image(decoded[0], center, scale, INPUT_WH)
        metric.add_predictions(
            [image_id],
            np.concatenate([pred, scores[0][:, None]], 1)[None],
            [1.0],
            [float(np.prod(scale))],
        )
    errors = np.concatenate(all_errors)
    assert errors.max() < 0.05 * codec.scale_factor.max()  # well below a heatmap pixel
    result = metric.compute()
    assert result["AP"] >= 0.99 and result["AR"] >= 0.99


def test_decode_accepts_torch_and_single():
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, SIGMA)
    kpts = _interior_points(np.random.default_rng(1), 1, 5)[0]
    hm, _ = codec.encode(kpts, np.ones(5))
    a, sa = codec.decode(hm)
    b, sb = codec.decode(torch.from_numpy(hm)[None].to(torch.bfloat16).float())
    assert a.shape == (5, 2) and b.shape == (1, 5, 2)
    np.testing.assert_allclose(a, b[0], atol=0.5)
    with pytest.raises(ValueError, match="heatmap size"):
        codec.decode(np.zeros((1, 5, 10, 10), np.float32))


def test_flip_consistency():
    kset = load_keypoint_set("coco17")
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, SIGMA)
    rng = np.random.default_rng(2)
    kpts = _interior_points(rng, 1, 17)[0]
    vis = np.ones(17, np.float32)
    heatmaps, _ = codec.encode(kpts, vis)
    # Mirror the crop: x -> W - 1 - x, and left/right keypoints exchange identities.
    mirrored = kpts.copy()
    mirrored[:, 0] = INPUT_WH[0] - 1 - mirrored[:, 0]
    mirrored = mirrored[kset.flip_index]
    heatmaps_mirrored, _ = codec.encode(mirrored, vis)
    back = flip_heatmaps(heatmaps_mirrored[None], kset.flip_index)[0]
    np.testing.assert_allclose(back, heatmaps, atol=1e-5)
    back_t = flip_heatmaps(torch.from_numpy(heatmaps_mirrored[None]), kset.flip_index)
    np.testing.assert_allclose(back_t.numpy()[0], heatmaps, atol=1e-5)
    # decode(flip_heatmaps(h)) equals the mirrored keypoints
    decoded, _ = codec.decode(flip_heatmaps(heatmaps[None], kset.flip_index))
    np.testing.assert_allclose(decoded[0], mirrored, atol=0.1)
    with pytest.raises(ValueError):
        flip_heatmaps(heatmaps, kset.flip_index)  # missing batch dim


def _reference_dark_udp(heatmap: np.ndarray, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """DARK-UDP refinement of one (h, w) heatmap, written from the published formulas in float64.

    Zero-padded OpenCV Gaussian blur (sigma from the kernel size) rescaled to the original maximum,
    clip to [1e-3, 50], log, edge padding, central-difference gradient; the mixed derivative is the
    mean of the forward and backward one-sided mixed differences (mmpose's stencil); one Newton step
    ``x -= (H + eps I)^-1 g`` from the integer argmax. Returns (refined (x, y), integer argmax).
    """
    y0, x0 = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    border = kernel // 2
    padded = np.pad(heatmap.astype(np.float64), border)
    blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
    blurred *= heatmap.max() / blurred.max()
    logmap = np.pad(np.log(np.clip(blurred, 1e-3, 50.0)), 1, mode="edge")
    x, y = x0 + 1, y0 + 1

    def at(dx, dy):
        return logmap[y + dy, x + dx]

    grad = np.array([at(1, 0) - at(-1, 0), at(0, 1) - at(0, -1)]) / 2
    dxx = at(1, 0) - 2 * at(0, 0) + at(-1, 0)
    dyy = at(0, 1) - 2 * at(0, 0) + at(0, -1)
    forward = at(1, 1) - at(1, 0) - at(0, 1) + at(0, 0)
    backward = at(0, 0) - at(-1, 0) - at(0, -1) + at(-1, -1)
    dxy = (forward + backward) / 2
    hessian = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
    start = np.array([x0, y0], dtype=np.float64)
    return start - np.linalg.solve(hessian, grad), start


def test_dark_udp_matches_the_published_refinement_on_noisy_sigma6_heatmaps():
    """Noisy sigma-6 peaks (published 256x192 heatmaps, shrunk to 64x48 for speed): the decoder
    applies the full Newton step as mmpose does, including steps longer than one heatmap pixel."""
    rng = np.random.default_rng(7)
    codec = UDPHeatmap(INPUT_WH, HEATMAP_WH, sigma=6.0)
    n, k = 6, 17
    kpts = _interior_points(rng, n, k, margin=0.05)  # input-crop pixels
    heatmaps = np.stack([codec.encode(p, np.ones(k, np.float32))[0] for p in kpts])
    # Network-like corruption: white noise, a weaker second bump, an amplitude below 1.
    heatmaps = heatmaps * rng.uniform(0.4, 1.0, (n, k, 1, 1)).astype(np.float32)
    heatmaps += rng.normal(0, 0.08, heatmaps.shape).astype(np.float32)
    second, _ = codec.encode(_interior_points(rng, 1, k)[0], np.ones(k, np.float32))
    heatmaps += 0.3 * second[None]
    heatmaps = heatmaps.astype(np.float32)

    decoded, _ = codec.decode(heatmaps)
    steps = []
    for i in range(n):
        for j in range(k):
            expected, start = _reference_dark_udp(heatmaps[i, j])
            steps.append(np.abs(expected - start).max())
            np.testing.assert_allclose(
                decoded[i, j] / codec.scale_factor, expected, atol=2e-3, err_msg=f"instance {i} keypoint {j}"
            )
    steps = np.asarray(steps)
    # The noise makes some Newton steps longer than one heatmap pixel: those used to be dropped.
    assert (steps > 1.0).sum() >= 3, f"too few long steps to test the old guard: {np.sort(steps)[-5:]}"
