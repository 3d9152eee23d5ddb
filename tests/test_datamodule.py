"""PretrainTransform and ShardDataModule (alone and driven by a Lightning Trainer)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from sapiens.data.datamodule import ShardDataModule
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD, normalize_images
from sapiens.data.pretrain_transform import PretrainTransform, sample_resized_crop
from tests.test_shards import make_pretrain_shards

MEAN = np.asarray(IMAGE_MEAN, np.float32)
STD = np.asarray(IMAGE_STD, np.float32)


def gradient_image(h: int = 48, w: int = 64) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 255 // (w - 1), ys * 255 // (h - 1), (xs + ys) % 256], -1).astype(np.uint8)


# -- PretrainTransform ----------------------------------------------------------------------
def test_pretrain_transform_shape_dtype_and_normalisation():
    constant = np.empty((40, 50, 3), np.uint8)
    constant[:] = (200, 100, 30)
    out = PretrainTransform((16, 24), seed=0)({"image": constant})
    assert set(out) == {"image"}
    assert out["image"].shape == (3, 16, 24) and out["image"].dtype == torch.uint8
    assert torch.equal(out["image"][:, 5, 7], torch.tensor([200, 100, 30], dtype=torch.uint8))
    image = normalize_images(out["image"])  # what the LightningModule does on the device
    assert image.dtype == torch.float32
    expected = (np.array([200, 100, 30], np.float32) - MEAN) / STD
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(image.std(dim=(1, 2)).numpy(), 0, atol=1e-5)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_full_image_crop_is_identity_up_to_flip(flip):
    image = gradient_image(48, 64)
    transform = PretrainTransform((48, 64), scale=(1, 1), ratio=(64 / 48, 64 / 48), hflip_prob=flip)
    out = transform({"image": image})["image"].numpy().transpose(1, 2, 0)
    expected = image[:, ::-1] if flip else image
    np.testing.assert_array_equal(out, expected)


def test_resized_crop_boxes_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_resized_crop(48, 64, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert top >= 0 and top + h <= 48 and left >= 0 and left + w <= 64
        assert 0.2 * 0.9 <= h * w / (48 * 64) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # A 4:1 image cannot host a full-area crop with ratio <= 4/3: centred fallback.
    width = round(20 * 4 / 3)
    assert sample_resized_crop(20, 80, (1, 1), (3 / 4, 4 / 3), rng) == (
        0,
        (80 - width) // 2,
        20,
        width,
    )


def test_reseed_makes_crops_reproducible():
    image = gradient_image()
    transform = PretrainTransform((16, 16))
    transform.reseed(5)
    first = [transform({"image": image})["image"] for _ in range(3)]
    transform.reseed(5)
    again = [transform({"image": image})["image"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])


def test_pretrain_transform_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        PretrainTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        PretrainTransform((8, 8))({"image": np.zeros((8, 8), np.uint8)})


# -- ShardDataModule ------------------------------------------------------------------------
def test_datamodule_train_and_val_batches(tmp_path):
    shards = make_pretrain_shards(tmp_path, [6, 5, 7])
    dm = ShardDataModule(
        train_shards=str(tmp_path / "shard{0..2}-000000.tar"),
        val_shards=shards[:2],
        train_transform=PretrainTransform((16, 16)),
        val_transform=PretrainTransform((16, 16), scale=(1, 1), hflip_prob=0),
        batch_size=4,
        val_batch_size=5,
        num_workers=2,
        epoch_length=3,
        shuffle_buffer=8,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["image"].shape == (4, 3, 16, 16) and batches[0]["image"].dtype == torch.uint8
    assert batches[0]["image"].is_contiguous(memory_format=torch.channels_last)
    assert batches[0]["num_skipped"].dtype == torch.int64
    val = list(dm.val_dataloader())
    assert sum(b["image"].shape[0] for b in val) == 11


def test_datamodule_setup_reports_bad_specs(tmp_path):
    make_pretrain_shards(tmp_path, [2])
    missing = ShardDataModule(str(tmp_path / "shard{0..3}-000000.tar"), epoch_length=2)
    with pytest.raises(FileNotFoundError, match=r"train_shards: .*3 of 4 shards are missing"):
        missing.setup("fit")
    no_length = ShardDataModule(str(tmp_path / "shard0-000000.tar"))
    with pytest.raises(ValueError, match="epoch_length"):
        no_length.setup("fit")
    with pytest.raises(ValueError, match="reader must be one of"):
        ShardDataModule(str(tmp_path), reader="video")


class _TinyModel(pl.LightningModule):
    """Records what the loop saw: batches per epoch and skip counts."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: dict[int, list[list[str]]] = {}
        self.val_samples = 0

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["key"])
        return self.layer(batch["image"].float().mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.val_samples += batch["image"].shape[0]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _keys_transform(sample):
    out = PretrainTransform((8, 8), seed=0)(sample)
    out["key"] = sample["key"]
    return out


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, True)])
def test_trainer_runs_nominal_epochs_with_fresh_streams(tmp_path, workers, persistent):
    shards = make_pretrain_shards(tmp_path, [9, 4, 6])
    dm = ShardDataModule(
        train_shards=shards,
        val_shards=shards,
        train_transform=_keys_transform,
        val_transform=_keys_transform,
        batch_size=3,
        num_workers=workers,
        persistent_workers=persistent,
        epoch_length=4,
        shuffle_buffer=5,
    )
    model = _TinyModel()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == [0, 1]
    assert [len(model.seen[e]) for e in (0, 1)] == [4, 4]
    assert model.seen[0] != model.seen[1]  # the epoch number reached the stream
    assert model.val_samples == 2 * 19  # one full validation pass per epoch
