"""Dense sample transforms: shapes / dtypes, flip and rotation consistency of labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sapiens.data.dense_transform import GOLIATH_SEG_SWAP_PAIRS, IMAGE_MEAN, DenseTransform
from sapiens.data.normalize import normalize_images

H, W = 64, 48


def _sample(task: str, seed: int = 0, size: tuple[int, int] = (H, W)) -> dict:
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sample = {"key": f"{task}_{seed}", "image": image}
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    if task == "seg":
        seg = rng.integers(1, 28, (h, w)).astype(np.uint8)
        seg[:4] = 255
        sample["seg"] = seg
    elif task == "depth":
        sample["depth"] = np.where(mask, rng.uniform(1, 3, (h, w)), 0).astype(np.float32)
        sample["mask"] = mask
    else:
        normal = rng.normal(size=(h, w, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        sample["normal"] = np.where(mask[..., None], normal, 0).astype(np.float32)
        sample["mask"] = (mask * 255).astype(np.uint8)  # as decoded from mask.png
    return sample


@pytest.mark.parametrize("task", ["seg", "depth", "normal"])
@pytest.mark.parametrize("train", [True, False])
def test_output_shapes_and_dtypes(task: str, train: bool) -> None:
    out = DenseTransform(task, (32, 24), train=train)(_sample(task), np.random.default_rng(0))
    assert out["key"] == f"{task}_0"
    assert out["image"].shape == (3, 32, 24) and out["image"].dtype == torch.uint8
    if task == "seg":
        assert out["seg"].shape == (32, 24) and out["seg"].dtype == torch.int64
    elif task == "depth":
        assert out["depth"].shape == (32, 24) and out["depth"].dtype == torch.float32
        assert out["mask"].shape == (32, 24) and out["mask"].dtype == torch.bool
    else:
        assert out["normal"].shape == (3, 32, 24) and out["normal"].dtype == torch.float32
        assert out["mask"].dtype == torch.bool


def test_val_mode_is_a_plain_resize() -> None:
    sample = _sample("seg")
    transform = DenseTransform("seg", (32, 24), train=False)
    out = transform(sample, np.random.default_rng(0))
    again = transform(sample, np.random.default_rng(123))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["seg"], again["seg"])
    expected_seg = cv2.resize(sample["seg"], (24, 32), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out["seg"].numpy(), expected_seg)
    expected_image = cv2.resize(sample["image"], (24, 32), interpolation=cv2.INTER_LINEAR)
    assert out["image"].dtype == torch.uint8
    np.testing.assert_array_equal(out["image"].numpy().transpose(1, 2, 0), expected_image)


def test_image_is_uint8_and_normalises_to_zero_at_the_mean() -> None:
    sample = _sample("seg")
    sample["image"] = np.broadcast_to(np.round(IMAGE_MEAN).astype(np.uint8), (H, W, 3)).copy()
    out = DenseTransform("seg", (H, W), train=False)(sample)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert float(normalize_images(out["image"]).abs().max()) < 0.01


def _geometry_free(task: str, flip_prob: float) -> DenseTransform:
    """Train mode with zoom 1, no rotation, no colour change: only the flip is random."""
    return DenseTransform(
        task, (H, W), train=True, scale_range=(1.0, 1.0), rotate=0, flip_prob=flip_prob,
        photometric=False,
    )  # fmt: skip


@pytest.mark.parametrize("task", ["seg", "depth", "normal"])
def test_flip_consistency(task: str) -> None:
    sample = _sample(task, seed=5)
    plain = _geometry_free(task, 0.0)(sample, np.random.default_rng(1))
    flipped = _geometry_free(task, 1.0)(sample, np.random.default_rng(1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    if task == "seg":
        np.testing.assert_array_equal(plain["seg"].numpy(), sample["seg"])  # identity geometry
        swap = dict(GOLIATH_SEG_SWAP_PAIRS) | {b: a for a, b in GOLIATH_SEG_SWAP_PAIRS}
        expected = plain["seg"].flip(-1).clone()
        for a, b in swap.items():
            expected[plain["seg"].flip(-1) == a] = b
        assert torch.equal(flipped["seg"], expected)
        assert not torch.equal(flipped["seg"], plain["seg"].flip(-1))  # ids really swapped
    elif task == "depth":
        assert torch.equal(flipped["depth"], plain["depth"].flip(-1))
        assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    else:
        mirrored = plain["normal"].flip(-1)
        torch.testing.assert_close(flipped["normal"][0], -mirrored[0])
        torch.testing.assert_close(flipped["normal"][1:], mirrored[1:])
        assert torch.equal(flipped["mask"], plain["mask"].flip(-1))


def test_seg_rotation_keeps_ids_and_pads_background() -> None:
    sample = _sample("seg", seed=2)
    transform = DenseTransform(
        "seg", (H, W), train=True, scale_range=(0.6, 0.6), rotate=45, rotate_prob=1.0,
        flip_prob=0.0,
    )  # fmt: skip
    seg = transform(sample, np.random.default_rng(0))["seg"]
    values = set(seg.unique().tolist())
    assert values <= set(np.unique(sample["seg"]).tolist()) | {0}
    assert 0 in values and 255 in values  # padded corners and kept ignore pixels
    assert seg[0, 0] == 0 and seg[-1, -1] == 0


def test_depth_zoom_out_pads_with_background() -> None:
    sample = _sample("depth", seed=3)
    sample["mask"] = np.ones((H, W), dtype=bool)
    sample["depth"] = np.full((H, W), 2.0, dtype=np.float32)
    transform = DenseTransform("depth", (H, W), train=True, scale_range=(0.5, 0.5), rotate=0)
    out = transform(sample, np.random.default_rng(0))
    mask, depth = out["mask"], out["depth"]
    assert 0.2 < float(mask.float().mean()) < 0.3  # a quarter of the canvas is image
    assert torch.all(depth[mask] == 2.0) and torch.all(depth[~mask] == 0.0)


def _radial_normals(size: int, height: float = 20.0) -> np.ndarray:
    """Unit normals pointing away from the image centre: unchanged by any rotation about it."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    n = np.stack([x - c, y - c, np.full_like(x, height)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_rotates_normal_vectors(seed: int) -> None:
    size = 64
    field = _radial_normals(size)
    sample = {
        "key": "radial",
        "image": np.zeros((size, size, 3), dtype=np.uint8),
        "normal": field,
        "mask": np.ones((size, size), dtype=bool),
    }

    def run(y_down: bool) -> dict:
        transform = DenseTransform(
            "normal", (size, size), train=True, scale_range=(1.0, 1.0), rotate=90,
            rotate_prob=1.0, flip_prob=0.0, photometric=False, normals_y_down=y_down,
        )  # fmt: skip
        return transform(sample, np.random.default_rng(seed))

    def mean_error(out: dict) -> float:
        yy, xx = np.mgrid[0:size, 0:size]
        inner = ((yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2) < 28**2
        pred = out["normal"].numpy().transpose(1, 2, 0)
        cos = np.clip((pred * field).sum(-1), -1, 1)
        return float(np.degrees(np.arccos(cos))[inner].mean())

    out = run(True)
    normal, mask = out["normal"], out["mask"]
    lengths = normal.norm(dim=0)
    torch.testing.assert_close(lengths[mask], torch.ones_like(lengths[mask]))
    assert torch.all(lengths[~mask] == 0)
    assert mean_error(out) < 1.5  # only nearest-neighbour resampling error remains
    assert mean_error(run(False)) > 5.0  # the opposite rotation is clearly wrong


def test_train_mode_is_reproducible_and_random() -> None:
    sample = _sample("normal", seed=4)
    transform = DenseTransform("normal", (H, W), train=True)
    torch.manual_seed(0)
    a = transform(sample)
    torch.manual_seed(0)
    b = transform(sample)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["normal"], b["normal"])
    c = transform(sample)
    assert not torch.equal(a["image"], c["image"])


def test_photometric_changes_only_the_image() -> None:
    sample = _sample("seg", seed=6)
    kwargs = {"scale_range": (1.0, 1.0), "rotate": 0, "flip_prob": 0.0}
    base = DenseTransform("seg", (H, W), True, photometric=False, **kwargs)
    jitter = DenseTransform("seg", (H, W), True, photometric=True, **kwargs)
    changed = 0
    for seed in range(4):
        a = base(sample, np.random.default_rng(seed))
        b = jitter(sample, np.random.default_rng(seed))
        assert torch.equal(a["seg"], b["seg"])
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 2


def test_bad_samples_raise_clear_errors() -> None:
    transform = DenseTransform("depth", (32, 24), train=False)
    sample = _sample("depth")
    del sample["mask"]
    with pytest.raises(ValueError, match="depth_0.*mask"):
        transform(sample)
    sample = _sample("seg")
    sample["seg"] = sample["seg"][:10]
    with pytest.raises(ValueError, match="seg_0.*'seg'"):
        DenseTransform("seg", (32, 24), train=False)(sample)
    sample = _sample("seg")
    sample["image"] = sample["image"].astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        DenseTransform("seg", (32, 24), train=False)(sample)
    with pytest.raises(ValueError, match="task"):
        DenseTransform("pose", (32, 24), train=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_image_and_labels_stay_aligned_under_random_geometry(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(1, 28, (8, 6)).astype(np.uint8)
    seg = np.kron(tiles, np.ones((8, 8), dtype=np.uint8))  # 64 x 48 of 8-px blocks
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    sample = {"key": "blocks", "image": palette[seg], "seg": seg}
    transform = DenseTransform(
        "seg", (H, W), train=True, scale_range=(0.7, 1.5), rotate=40, rotate_prob=1.0,
        flip_prob=0.0, photometric=False,
    )  # fmt: skip
    out = transform(sample, np.random.default_rng(seed))
    labels = out["seg"].numpy()
    image = out["image"].numpy().transpose(1, 2, 0).astype(np.float32)
    # Interior pixels (3x3 neighbourhood of one label) must show that label's colour.
    uniform = np.ones_like(labels, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            uniform &= np.roll(labels, (dy, dx), axis=(0, 1)) == labels
    interior = uniform & (labels != 0)
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    assert interior.sum() > 500
    np.testing.assert_allclose(image[interior], palette[labels[interior]], atol=1.5)
