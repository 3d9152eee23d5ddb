"""WebDataset train / eval pipelines that yield collated batches (shard specs: ``shard_urls``).

Stream per DataLoader worker (rank r of world W, worker w of N):
shard urls -> tar samples (webdataset tar iterator; tar-level errors warned, counted, skipped)
-> sample shuffle buffer -> reader (decode; corrupt samples warned, counted, skipped)
-> ``sample_transform`` (dict, list of dicts flattened, or None to drop) -> batches, collated
inside the worker into reused shared memory (``batch_buffers``), each carrying ``num_skipped``
(int64 scalar tensor: samples/tars skipped by that worker since its previous batch).

Epochs (train): the loader yields exactly ``epoch_length`` batches per rank and epoch; worker w
yields ``epoch_length // N`` batches plus one if ``w < epoch_length % N``, so the total does not
scale with ``num_workers`` (webdataset issue #303) and every rank yields the same count (no DDP
hang on uneven shards). Worker streams never run dry: ``resampled`` draws shards with
replacement (like webdataset's ResampledShards, seeded per rank, worker and epoch), otherwise
the shard list is reshuffled (same order on every rank), split by rank then by worker, and
repeated. All randomness comes from (seed, epoch, rank, worker), so a run resumed at epoch e
sees the same stream as the original epoch e: a transform with a ``reseed(seed)`` method is
reseeded at each epoch start, and worker processes also seed ``random``, ``numpy.random`` and
``torch``. Skips are logged for the first 5 per worker, then at most once a minute; a streak of
skips ends the stream after a count or a time budget, or on SIGTERM / SIGINT (``skips``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from sapiens.data.batch_buffers import PoolFlags, buffer_pool
from sapiens.data.collate import collate_dicts
from sapiens.data.readers import CorruptSampleError, get_reader
from sapiens.data.shard_loader import ShardLoader
from sapiens.data.shard_urls import expand_shards
from sapiens.data.skips import SkipTally, new_stop_flag

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixing all ``parts`` (e.g. seed, epoch, rank, worker) well."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed, else RANK/WORLD_SIZE env."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        index = rng.randrange(bufsize)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Per-worker sample stream over shards, batched and collated inside the worker.

    Built by :func:`build_train_pipeline` / :func:`build_eval_pipeline`; iterate it through
    :class:`ShardLoader`. ``mode`` is ``"resampled"`` or ``"shuffled"`` (infinite, per-worker
    batch quota from ``epoch_length``) or ``"eval"`` (one pass, partial last batch).
    """

    def __init__(
        self,
        urls: list[str],
        reader: Callable[[dict], dict],
        sample_transform: Callable[[dict], Any] | None,
        batch_size: int,
        mode: str,
        epoch_length: int | None,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        max_consecutive_bad_shards: int = 64,
        max_consecutive_skips: int = 10_000,
        max_skip_seconds: float | None = 300.0,
        reuse_buffers: bool = True,
    ):
        super().__init__()
        self.urls, self.reader, self.sample_transform = urls, reader, sample_transform
        self.batch_size, self.mode, self.epoch_length = batch_size, mode, epoch_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.max_consecutive_bad_shards = max_consecutive_bad_shards
        self.max_consecutive_skips = max_consecutive_skips
        self.max_skip_seconds = max_skip_seconds
        self.reuse_buffers = reuse_buffers  # see sapiens.data.batch_buffers
        self.pool_flags: PoolFlags | None = None  # set by ShardLoader before workers start
        # Shared with worker processes so persistent workers see the new epoch too.
        self._epoch = mp.Value("q", 0)
        self.stop_flag = new_stop_flag()  # set by SIGTERM / SIGINT (see sapiens.data.skips)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    # -- shard selection -------------------------------------------------------------------
    def _worker_shards(self, epoch: int, worker: int, nworkers: int) -> Iterator[str]:
        if self.mode == "resampled":
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, 1))
            while True:
                yield rng.choice(self.urls)
        single_pass = self.mode == "eval" or self.epoch_length is None
        for repeat in range(1 if single_pass else 2**62):
            order = list(self.urls)
            if self.mode == "shuffled":  # same permutation on every rank and worker
                random.Random(derive_seed(self.seed, epoch, repeat, 2)).shuffle(order)
            mine = order[self.rank :: self.world_size][worker::nworkers]
            if not mine and self.mode == "shuffled":
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}/{nworkers} got no shard out of "
                    f"{len(self.urls)}: need at least world_size x num_workers shards "
                    "(or use resampled=True)"
                )
            yield from mine

    def _raw_samples(self, shards: Iterator[str], tally: SkipTally) -> Iterator[dict]:
        errors_in_shard = 0

        def on_tar_error(exn: Exception) -> bool:
            nonlocal errors_in_shard
            errors_in_shard += 1
            if errors_in_shard == 1:  # one broken tar can raise several times; count it once
                tally.skip(f"tar-level error: {exn!r}"[:500])
            return True  # keep going (webdataset then moves on to the next shard)

        failed: list[str] = []  # consecutive shards that produced nothing
        for url in shards:
            produced, errors_in_shard = 0, 0
            for sample in tarfile_samples([{"url": url}], handler=on_tar_error):
                produced += 1
                yield sample
            failed = [] if produced else [*failed, url]
            if len(failed) >= self.max_consecutive_bad_shards:
                raise RuntimeError(
                    f"rank {self.rank}: {len(failed)} shards in a row yielded no sample "
                    f"(e.g. {failed[:3]}); the shard list looks unreadable"
                )

    def _decoded(self, raw: Iterable[dict], tally: SkipTally) -> Iterator[dict]:
        for sample in raw:
            try:
                out = self.reader(sample)
            except CorruptSampleError as err:
                tally.skip(str(err))
                continue
            except Exception as err:  # noqa: BLE001 - decoder libraries raise assorted types
                tally.skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: {err!r}")
                continue
            if self.sample_transform is not None:
                try:  # only data errors are skipped; any other transform error is a bug
                    out = self.sample_transform(out)
                except CorruptSampleError as err:
                    if err.url is None:  # name the shard even when the transform could not
                        err = CorruptSampleError(err.key, err.reason, sample.get("__url__"))
                    tally.skip(str(err))
                    continue
            tally.good()
            if out is None:
                continue
            yield from out if isinstance(out, list) else [out]

    def _batches(self, samples: Iterable[dict], tally: SkipTally) -> Iterator[dict]:
        def collate(batch: list[dict]) -> list[dict]:
            """[the collated batch], or [] when every sample turned out corrupt while collating
            (JPEGs decoded in the collate: ``PretrainTransform(resize_on="device")``; such a
            batch loses its corrupt samples, so it can be smaller than ``batch_size``)."""
            pool = buffer_pool(self.pool_flags) if self.reuse_buffers else None
            out = collate_dicts(batch, pool, on_corrupt=tally.skip)
            if out is None:
                return []
            out["num_skipped"] = tally.take()  # an int: a tensor would cost a hand-over of its own
            return [out]

        batch: list[dict] = []
        for sample in samples:
            if len(batch) == self.batch_size:  # emit lazily so num_skipped sees trailing skips
                yield from collate(batch)
                batch = []
            batch.append(sample)
        if batch and (len(batch) == self.batch_size or self.mode == "eval"):
            yield from collate(batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self._epoch.value)
        transform_seed = derive_seed(self.seed, epoch, self.rank, worker, 3)
        if info is not None:  # worker processes: make global RNGs per-worker and reproducible
            random.seed(transform_seed)
            np.random.seed(transform_seed)
            torch.manual_seed(transform_seed)
        if hasattr(self.sample_transform, "reseed"):
            self.sample_transform.reseed(transform_seed)
        tally = SkipTally(self.max_consecutive_skips, self.max_skip_seconds, self.stop_flag)
        raw = self._raw_samples(self._worker_shards(epoch, worker, nworkers), tally)
        if self.mode != "eval" and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, 4))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        batches = self._batches(self._decoded(raw, tally), tally)
        if self.epoch_length is None:  # eval, or one shuffled pass
            return batches
        quota = self.epoch_length // nworkers + int(worker < self.epoch_length % nworkers)
        return islice(batches, quota)


def _check_common(batch_size: int, num_workers: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def build_train_pipeline(
    shards: str | Sequence[str],
    batch_size: int,
    epoch_length: int | None,
    reader: str | Callable[[dict], dict] = "pretrain",
    sample_transform: Callable[[dict], Any] | None = None,
    *,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    num_workers: int = 2,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    epoch_fn: Callable[[], int] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    max_consecutive_bad_shards: int = 64,
    max_consecutive_skips: int = 10_000,
    max_skip_seconds: float | None = 300.0,
    reuse_buffers: bool = True,
) -> ShardLoader:
    """Training loader yielding exactly ``epoch_length`` batches per rank and epoch.

    Args:
        shards: spec for :func:`expand_shards`.
        batch_size: samples per batch on this rank (full batches only).
        epoch_length: batches per rank and epoch (same on every rank). ``None`` is only
            allowed without resampling on a single rank: then an epoch is one shuffled pass over
            all shards, each worker dropping its last partial batch.
        reader: name in ``readers.READERS`` or a callable raw sample -> dict.
        sample_transform: decoded dict -> dict | list[dict] | None (None drops the sample). A
            transform with ``reads_encoded = True`` gets images still encoded, from the
            reader's encoded variant (``readers.ENCODED_READERS``), and decodes them itself.
        resampled: draw shards with replacement (seeded per rank and worker); otherwise shuffle
            the shard list per epoch, split by rank then worker (needs at least
            ``world_size * max(1, num_workers)`` shards) and repeat it.
        shuffle_buffer: raw samples held per worker for shuffling (<= 1 disables).
        rank, world_size: default from torch.distributed, else RANK / WORLD_SIZE, else 0 / 1.
        epoch_fn: returns the epoch at each ``iter()`` (else see :class:`ShardLoader`).
        max_consecutive_bad_shards, max_consecutive_skips, max_skip_seconds: a worker raises
            RuntimeError after this many shards in a row gave no sample / this many skips in a row /
            this many seconds of skips without a good sample, instead of spinning on unusable data.
        reuse_buffers: workers build batches in recycled shared memory
            (:mod:`sapiens.data.batch_buffers`); False allocates fresh memory per batch.

    Returns:
        A :class:`ShardLoader`; batches are dicts from ``collate.collate_dicts`` plus
        ``num_skipped`` (int64 scalar tensor).
    """
    _check_common(batch_size, num_workers)
    rank, world_size = dist_info(rank, world_size)
    if epoch_length is None and (resampled or world_size > 1):
        raise ValueError(
            "epoch_length (batches per rank per epoch) is required with resampled=True or more "
            f"than one rank (world_size={world_size}): nominal epochs keep ranks in step"
        )
    if epoch_length is not None and int(epoch_length) < 1:
        raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
    urls = expand_shards(shards)
    if not resampled and len(urls) < world_size * max(1, num_workers):
        raise ValueError(
            f"{len(urls)} shards cannot be split over {world_size} ranks x {max(1, num_workers)} "
            "workers without resampling; use resampled=True, fewer workers or more shards"
        )
    stream = ShardStream(
        urls,
        get_reader(reader, encoded=getattr(sample_transform, "reads_encoded", False)),
        sample_transform,
        int(batch_size),
        mode="resampled" if resampled else "shuffled",
        epoch_length=None if epoch_length is None else int(epoch_length),
        shuffle_buffer=int(shuffle_buffer),
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        max_consecutive_bad_shards=max_consecutive_bad_shards,
        max_consecutive_skips=max_consecutive_skips,
        max_skip_seconds=max_skip_seconds,
        reuse_buffers=reuse_buffers,
    )
    return ShardLoader(stream, num_workers, pin_memory, persistent_workers, prefetch_factor, epoch_fn)


def build_eval_pipeline(
    shards: str | Sequence[str],
    batch_size: int,
    reader: str | Callable[[dict], dict] = "pretrain",
    sample_transform: Callable[[dict], Any] | None = None,
    *,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    max_consecutive_skips: int = 10_000,
    max_skip_seconds: float | None = 300.0,
    reuse_buffers: bool = True,
) -> ShardLoader:
    """One ordered pass over this rank's shards (``shards[rank::world][worker::workers]``),
    partial last batch kept. Every sample is seen exactly once across ranks and workers; ranks
    may get different batch counts when shards are uneven (mind collectives in validation)."""
    _check_common(batch_size, num_workers)
    rank, world_size = dist_info(rank, world_size)
    urls = expand_shards(shards)
    if len(urls) < world_size:
        raise ValueError(f"eval needs at least one shard per rank: {len(urls)} shards for {world_size} ranks")
    stream = ShardStream(
        urls,
        get_reader(reader, encoded=getattr(sample_transform, "reads_encoded", False)),
        sample_transform,
        int(batch_size),
        mode="eval",
        epoch_length=None,
        shuffle_buffer=0,
        seed=0,
        rank=rank,
        world_size=world_size,
        max_consecutive_skips=max_consecutive_skips,
        max_skip_seconds=max_skip_seconds,
        reuse_buffers=reuse_buffers,
    )
    return ShardLoader(stream, num_workers, pin_memory, persistent_workers, prefetch_factor)
