"""LightningDataModule over WebDataset shards (any shard type, via a reader and a transform).

Batches per epoch (per rank):
- ``epoch_length`` set: exactly ``epoch_length`` batches on every rank, so one epoch covers
  ``epoch_length * batch_size * world_size`` samples in total (nominal epochs; required when
  ``resampled`` or when training on more than one rank, so that ranks never get uneven counts).
- ``resampled=False``, one rank, ``epoch_length=None``: one shuffled pass over all shards; each
  worker drops its last partial batch, so it is ``sum over workers of
  floor(samples_of_worker / batch_size)`` batches (``len()`` is then unknown).
- Validation: one ordered pass over this rank's shards, last partial batch kept.
Every batch holds ``num_skipped`` (int64 scalar tensor): corrupt samples or tars skipped by the
worker since its previous batch; sum and log it in the LightningModule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from sapiens.data.readers import READERS
from sapiens.data.shard_loader import ShardLoader
from sapiens.data.shard_urls import expand_shards
from sapiens.data.shards import build_eval_pipeline, build_train_pipeline, dist_info

log = logging.getLogger(__name__)


class ShardDataModule(pl.LightningDataModule):
    """Train / val loaders over WebDataset shards.

    Args:
        train_shards: shard spec (brace pattern, list, ``.txt`` list file, folder, URLs, ``pipe:``).
        val_shards: optional shard spec for validation.
        reader: shard type: ``pretrain``, ``pose``, ``seg``, ``depth`` or ``normal``.
        train_transform: decoded sample dict -> dict, list of dicts (flattened) or None (drop).
        val_transform: the same for validation; None collates decoded samples as they are.
        batch_size: samples per batch per device.
        val_batch_size: defaults to ``batch_size``.
        num_workers: DataLoader workers per rank (decode, transform and batch happen there).
        resampled: draw shards with replacement (recommended for training at scale).
        epoch_length: batches per rank per epoch (see module docstring).
        shuffle_buffer: raw samples per worker in the shuffle buffer.
        seed: base seed; streams depend only on (seed, epoch, rank, worker).
        pin_memory, persistent_workers, prefetch_factor: passed to the DataLoader.
        max_consecutive_skips, max_skip_seconds: a streak of skipped samples this long (in count or
            in seconds without a good sample) stops the run: the data is unusable.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None,
        val_shards: str | Sequence[str] | None = None,
        reader: str = "pretrain",
        train_transform: Callable[[dict], Any] | None = None,
        val_transform: Callable[[dict], Any] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        resampled: bool = True,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        max_consecutive_skips: int = 10_000,
        max_skip_seconds: float | None = 300.0,
    ):
        super().__init__()
        if reader not in READERS:
            raise ValueError(f"reader must be one of {sorted(READERS)}, got {reader!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_shards = _plain(train_shards)
        self.val_shards = _plain(val_shards)
        self.reader = reader
        self.train_transform = train_transform
        self.val_transform = val_transform
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.resampled = bool(resampled)
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.skip_limits = {
            "max_consecutive_skips": int(max_consecutive_skips),
            "max_skip_seconds": None if max_skip_seconds is None else float(max_skip_seconds),
        }
        self._loaders: list[ShardLoader] = []  # closed in teardown (persistent workers)

    # -- distributed context -----------------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) from the attached trainer, else torch.distributed / env."""
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return dist_info()

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Check shard specs early (missing files, empty patterns) and the epoch settings."""
        _, world = self.rank_and_world()
        if stage in (None, "fit"):
            if self.train_shards is None:
                raise ValueError("ShardDataModule: train_shards is required for fitting")
            _check_spec("train_shards", self.train_shards)
            if self.epoch_length is None and (self.resampled or world > 1):
                raise ValueError(
                    "ShardDataModule: set epoch_length (batches per rank per epoch); it is "
                    f"required with resampled=True or world size > 1 (world size {world})"
                )
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            _check_spec("val_shards", self.val_shards)
        if stage == "validate" and self.val_shards is None:
            raise ValueError("ShardDataModule: val_shards is required for validation")

    def train_dataloader(self) -> ShardLoader:
        if self.train_shards is None:
            raise ValueError("ShardDataModule: train_shards is required for training")
        rank, world = self.rank_and_world()
        loader = build_train_pipeline(
            self.train_shards,
            self.batch_size,
            self.epoch_length,
            self.reader,
            self.train_transform,
            resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer,
            num_workers=self.num_workers,
            seed=self.seed,
            rank=rank,
            world_size=world,
            epoch_fn=self._current_epoch if self.trainer is not None else None,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            **self.skip_limits,
        )
        self._loaders.append(loader)
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []  # Lightning skips validation for an empty list
        rank, world = self.rank_and_world()
        loader = build_eval_pipeline(
            self.val_shards,
            self.val_batch_size,
            self.reader,
            self.val_transform,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            **self.skip_limits,
        )
        self._loaders.append(loader)
        return loader

    def teardown(self, stage: str | None = None) -> None:
        """Stop the worker processes of the loaders built so far."""
        for loader in self._loaders:
            loader.close()
        self._loaders.clear()


def _plain(spec: Any) -> str | list[str] | None:
    """Hydra passes ListConfig; turn it into plain strings so workers can pickle it."""
    if spec is None or isinstance(spec, str):
        return spec
    return [str(s) for s in spec]


def _check_spec(name: str, spec: str | list[str]) -> None:
    try:
        urls = expand_shards(spec)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"ShardDataModule.{name}: {err}") from None
    log.info("%s: %d shard(s), first %s", name, len(urls), urls[0])
