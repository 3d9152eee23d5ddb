"""uint8 images from the transforms, normalised on the device by the LightningModule hook."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from sapiens.data.collate import collate_dicts
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD, image_to_tensor, normalize_images
from sapiens.lit.base import SapiensModule
from sapiens.visualize import denormalize


def _images(n: int, h: int = 12, w: int = 10, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_normalize_images_matches_the_formula_and_round_trips():
    batch = torch.from_numpy(np.stack(_images(3))).permute(0, 3, 1, 2).contiguous()
    out = normalize_images(batch)
    mean = np.asarray(IMAGE_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(IMAGE_STD, np.float32)[None, :, None, None]
    expected = (batch.numpy().astype(np.float32) - mean) / std
    assert out.dtype == torch.float32 and out.shape == batch.shape and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    # pictures drawn from normalised batches recover the original pixels
    np.testing.assert_array_equal(denormalize(out[1]), batch[1].permute(1, 2, 0).numpy())
    # one image (3, H, W) works too; float input is already normalised and passes through
    np.testing.assert_allclose(normalize_images(batch[0]).numpy(), expected[0], rtol=1e-6, atol=1e-6)
    assert normalize_images(out) is out


def test_normalize_images_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 or float"):
        normalize_images(torch.zeros(1, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_images(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 pixels"):
        image_to_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        image_to_tensor(np.zeros((4, 4), np.uint8))


def test_image_to_tensor_is_a_view_and_handles_flipped_arrays():
    image = _images(1)[0]
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 12, 10) and tensor.dtype == torch.uint8
    assert tensor.data_ptr() == image.ctypes.data  # no copy in the worker
    flipped = image_to_tensor(image[:, ::-1])
    np.testing.assert_array_equal(flipped.permute(1, 2, 0).numpy(), image[:, ::-1])


class _Batches(IterableDataset):
    def __init__(self, images: list[np.ndarray]):
        self.images = images

    def __iter__(self):
        yield collate_dicts([{"image": image_to_tensor(im), "n": i} for i, im in enumerate(self.images)])


@pytest.mark.parametrize("workers", [0, 1])
def test_collate_builds_channel_last_uint8_batches(workers):
    images = _images(4, seed=workers)
    (batch,) = list(DataLoader(_Batches(images), batch_size=None, num_workers=workers))
    image = batch["image"]
    assert image.shape == (4, 3, 12, 10) and image.dtype == torch.uint8
    assert image.is_contiguous(memory_format=torch.channels_last)  # one plain copy per sample
    assert normalize_images(image).is_contiguous()  # what the models get
    np.testing.assert_array_equal(image.permute(0, 2, 3, 1).numpy(), np.stack(images))
    assert batch["n"].tolist() == [0, 1, 2, 3]


def test_module_hook_normalises_uint8_images_only():
    module = SapiensModule()
    images = _images(2)
    batch = collate_dicts([{"image": image_to_tensor(im), "key": str(i)} for i, im in enumerate(images)])
    out = module.on_after_batch_transfer(batch, 0)
    assert out["image"].dtype == torch.float32 and out["key"] == ["0", "1"]
    torch.testing.assert_close(out["image"], normalize_images(batch["image"]))
    already = {"image": torch.randn(2, 3, 4, 4)}
    assert module.on_after_batch_transfer(already, 0)["image"] is already["image"]
    assert module.on_after_batch_transfer([1, 2], 0) == [1, 2]  # non-dict batches untouched


class _DtypeProbe(SapiensModule):
    """Records the image dtype that reaches training_step through a real Trainer."""

    def __init__(self):
        super().__init__(optimizer={"lr": 1e-3})
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[torch.dtype] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["image"].dtype)
        return self.layer(batch["image"].mean(dim=(2, 3)).to(self.layer.weight.dtype)).mean()


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-true", torch.bfloat16)])
def test_trainer_delivers_normalised_images_in_the_precision_dtype(tmp_path, precision, dtype):
    import lightning.pytorch as pl

    module = _DtypeProbe()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(_Batches(_images(2)), batch_size=None))
    assert module.seen and all(d == dtype for d in module.seen)


def test_step_flags_ride_in_the_nonfinite_check():
    """Callback flags (e.g. the Slurm requeue request) are reduced with the non-finite check."""
    module = SapiensModule(optimizer={"lr": 1e-3})
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.step_flag_sources.update(requeue=lambda: True, other=lambda: False)
    module.guard_loss(torch.tensor(1.0))
    assert module.step_flags == {"requeue": True, "other": False} and not module._skip_update
    module.guard_loss(torch.tensor(float("nan")))
    assert module._skip_update and module.step_flags["requeue"]
