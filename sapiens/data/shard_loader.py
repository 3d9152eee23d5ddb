"""The loader over a :class:`~sapiens.data.shards.ShardStream`: a thin DataLoader wrapper that numbers
the epochs, stops its persistent workers on request and checks that each epoch yielded what it should."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from sapiens.data.batch_buffers import PoolFlags
from sapiens.data.skips import stop_on_signals

if TYPE_CHECKING:
    from sapiens.data.shards import ShardStream


class ShardLoader:
    """Iterable of collated batch dicts over a :class:`ShardStream` (a thin DataLoader wrapper).

    ``len()`` is the batches per epoch for train loaders (``epoch_length``); eval loaders have no
    length (one pass over the shards of this rank). Each ``iter()`` starts an epoch: the epoch
    number comes from ``epoch_fn()`` when given (the DataModule passes the trainer's
    ``current_epoch``), else from :meth:`set_epoch`, advancing by one after every iteration.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        epoch_fn: Callable[[], int] | None = None,
    ):
        self.stream = stream
        if stream.reuse_buffers and num_workers > 0:
            # A worker has at most prefetch_factor batches queued, plus the one the main process
            # holds and one in the pin-memory copy: more buffers would only sit in /dev/shm.
            stream.pool_flags = PoolFlags(num_workers, capacity=(prefetch_factor or 2) + 2)
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.loader = DataLoader(
            stream,
            batch_size=None,  # batches are built inside the workers
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close(self) -> None:
        """Stop persistent worker processes now instead of at garbage collection (where torch's
        shutdown can stall for seconds per worker)."""
        iterator = getattr(self.loader, "_iterator", None)  # torch keeps persistent workers here
        self.loader._iterator = None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __len__(self) -> int:
        if self.stream.epoch_length is None:
            raise TypeError("an eval ShardLoader has no length (one pass over its shards)")
        return self.stream.epoch_length

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        if self.epoch_fn is None:
            self.epoch += 1
        self.stream.set_epoch(epoch)
        stop_on_signals(self.stream.stop_flag)
        count = 0
        for batch in self.loader:
            count += 1
            batch["num_skipped"] = torch.tensor(batch["num_skipped"], dtype=torch.int64)
            yield batch
        expected = self.stream.epoch_length
        if count == 0 or (expected is not None and count != expected):
            raise RuntimeError(
                f"rank {self.stream.rank}: the {self.stream.mode} pipeline over "
                f"{len(self.stream.urls)} shards (first: {self.stream.urls[0]}) yielded {count} "
                f"batches, expected {expected or 'at least 1'}; all samples corrupt or skipped? "
                "(see the 'skipping:' warnings)"
            )
