"""Batch buffers that a DataLoader worker reuses once the main process has freed the batch.

Why: a batch built in a worker has to live in shared memory to reach the main process, and a
fresh shared-memory block costs far more than the copy into it: the kernel allocates and zeroes
every page (``fallocate`` plus a fault on first touch). Measured on the 2-core CI machine for a
batch of 16 images of 1024x768: 1.9 ms per image into fresh shared memory against 0.18 ms into
a reused buffer, while decoding the JPEG takes 2.4 ms. Reuse removes most of the hand-over cost.

Protocol (one :class:`BufferPool` per worker process, created lazily after the fork):

- each buffer has a byte in a shared ``lent`` array; the worker sets it when the buffer goes out
  in a batch and only reuses a buffer whose byte is clear. The array is a :class:`PoolFlags`
  made by the main process before the workers start (every tensor a batch carries costs a
  file-descriptor hand-over, ~0.3 ms), or, without one, the worker's own, sent with each batch;
- the batch travels as a :class:`PooledBatch`; unpickling it in the main process (in the
  DataLoader's result loop, before any pin-memory copy) registers a finalizer on each pooled
  tensor's storage that clears the byte once the storage is freed, i.e. after the training
  step, the pin-memory copy, or whatever else held the batch (views included) let it go;
- when every buffer is lent the worker allocates a fresh, unpooled block, so a consumer that
  keeps batches (a list of validation outputs, say) never sees one overwritten.

Memory: the shard pipeline gives each worker ``prefetch_factor + 2`` buffers, about the batches that
are in flight anyway; they stay in /dev/shm while the worker lives (size /dev/shm for
``workers x (prefetch_factor + 2) x batch bytes`` per rank, e.g. 8 x 4 x 100 MB at 1024x1024, batch 32).

The main process, when it builds batches itself (``num_workers=0``), keeps a pool of plain memory
that works the same way: a fresh 38 MB batch is page-faulted in at about 0.8 ms per MB too.
"""

from __future__ import annotations

import os
import uuid
import weakref

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["BufferPool", "PoolFlags", "PooledBatch", "buffer_pool"]

# token -> flags of the PoolFlags alive in this (main) process; batches name their flags by token.
_FLAGS: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


class PoolFlags:
    """The ``lent`` bytes of the pools of ``workers`` workers, ``capacity`` buffers each, in shared
    memory made by the main process (workers inherit them through fork or pickling)."""

    def __init__(self, workers: int, capacity: int = 8):
        self.token = uuid.uuid4().hex
        self.capacity = capacity
        self.flags = torch.zeros(max(1, workers) * capacity, dtype=torch.uint8).share_memory_()
        _FLAGS[self.token] = self.flags


def _release(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = 0


def _rebuild(batch: dict, flags: torch.Tensor | str, leases: list[tuple[torch.Tensor, int]]) -> dict:
    """Unpickle side of :class:`PooledBatch` (main process): watch each pooled storage."""
    flags = _FLAGS.get(flags) if isinstance(flags, str) else flags
    if flags is None:  # unpickled outside the process that owns the flags: buffers stay lent
        return batch
    for tensor, slot in leases:
        finalizer = weakref.finalize(tensor.untyped_storage(), _release, flags, slot)
        finalizer.atexit = False  # the worker may be gone at exit; nothing to hand back then
    return batch


class PooledBatch(dict):
    """A batch dict whose pooled tensors are handed back to their worker's pool when freed.

    Pickles to a plain ``dict`` (see :func:`_rebuild`), so consumers never see this class.
    ``flags``: the lent-flags tensor, or the token of a :class:`PoolFlags`.
    """

    def __init__(self, batch: dict, flags: torch.Tensor | str, leases: list[tuple[torch.Tensor, int]]):
        super().__init__(batch)
        self.flags, self.leases = flags, leases

    def __reduce__(self):  # pickling, i.e. the hand-over to the main process
        return _rebuild, (dict(self), self.flags, self.leases)

    def __copy__(self):  # the DataLoader's default_convert copies batches inside the worker
        return PooledBatch(dict(self), self.flags, self.leases)


class BufferPool:
    """Up to ``capacity`` reusable batch buffers of one process.

    A request is served by a free buffer of at least its size (and at most twice it), so
    batches whose size varies a little (packed images, see ``device_resize``) reuse buffers too.

    Args:
        capacity: buffers kept.
        shared: shared memory (a DataLoader worker) or plain memory (the main process).
        flags: ``(flags, offset, token)``: this pool's bytes are ``flags[offset:offset+capacity]``
            of a :class:`PoolFlags` with that token; None: the pool makes its own.

    Use: ``out = pool.empty(shape, dtype)`` for each batch tensor, then ``pool.wrap(batch)`` on the
    finished batch dict, which attaches the buffers handed out since the previous ``wrap``.
    """

    def __init__(
        self, capacity: int = 8, shared: bool = True, flags: tuple[torch.Tensor, int, str] | None = None
    ):
        if capacity < 1:
            raise ValueError(f"BufferPool capacity must be >= 1, got {capacity}")
        self.shared = shared
        if flags is None:
            own = torch.zeros(capacity, dtype=torch.uint8)
            flags = (own.share_memory_() if shared else own, 0, None)
        self.flags, self.offset, token = flags
        self.ref: torch.Tensor | str = token if token is not None else self.flags
        # A numpy view of this pool's bytes: reads and writes go to the (shared) flags.
        self._lent = self.flags.numpy()[self.offset : self.offset + capacity]
        # Shared: storages, sent as they are. Local: numpy arrays, handed out through a new
        # storage per batch (torch.from_numpy), so that the batch's storage dies, and fires its
        # finalizer, while the pool still holds the memory.
        self.buffers: list[torch.UntypedStorage | np.ndarray | None] = [None] * capacity
        self.pending: list[tuple[torch.Tensor, int]] = []
        self.fresh_allocations = 0  # blocks allocated because no pooled buffer was free

    @staticmethod
    def _size(buffer: torch.UntypedStorage | np.ndarray | None) -> int:
        if buffer is None:
            return -1
        return buffer.nbytes() if isinstance(buffer, torch.UntypedStorage) else buffer.nbytes

    def _acquire(self, nbytes: int) -> tuple[torch.UntypedStorage | np.ndarray, int | None]:
        free = np.flatnonzero(self._lent == 0)
        for slot in free:  # a free buffer big enough, but not wastefully so
            if nbytes <= self._size(self.buffers[slot]) <= 2 * nbytes:
                return self.buffers[slot], int(slot)
        for slot in free:  # an empty slot, else replace a free buffer of another size
            if self.buffers[slot] is None:
                break
        else:
            slot = free[0] if len(free) else None
        self.fresh_allocations += 1
        if self.shared:
            buffer = torch.UntypedStorage._new_shared(max(1, nbytes))
        else:
            buffer = np.empty(max(1, nbytes), np.uint8)
        if slot is None:
            return buffer, None
        self.buffers[slot] = buffer
        return buffer, int(slot)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, in a pooled buffer when one is free."""
        numel = int(np.prod(shape))
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buffer, slot = self._acquire(nbytes)
        storage = buffer if self.shared else torch.from_numpy(buffer).untyped_storage()
        out = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        if slot is not None:
            self._lent[slot] = 1
            self.pending.append((out, self.offset + slot))
        return out

    def discard_pending(self) -> None:
        """Hand back the buffers lent since the last :meth:`wrap` (their batch was dropped)."""
        for _, index in self.pending:
            self.flags[index] = 0
        self.pending = []

    def wrap(self, batch: dict) -> dict:
        """``batch`` as a :class:`PooledBatch` owning the buffers lent since the last call (a
        plain dict whose buffers are already watched, for a pool that is not shared)."""
        if not self.pending:
            return batch
        leases, self.pending = self.pending, []
        if not self.shared:
            return _rebuild(batch, self.flags, leases)
        return PooledBatch(batch, self.ref, leases)


_POOLS: dict[tuple, BufferPool] = {}


def buffer_pool(flags: PoolFlags | None = None) -> BufferPool:
    """This process's pool: shared memory inside a DataLoader worker (using its row of ``flags``
    when given), plain memory otherwise.

    Created on first use and keyed by process id: a pool inherited through fork is not reused,
    its buffers and flags belong to the parent.
    """
    info = get_worker_info()
    key = (os.getpid(), info is not None, flags.token if flags is not None else None)
    if key not in _POOLS:
        if info is None:
            _POOLS[key] = BufferPool(shared=False)
        elif flags is None:
            _POOLS[key] = BufferPool(shared=True)
        else:
            offset = info.id * flags.capacity
            _POOLS[key] = BufferPool(flags.capacity, True, (flags.flags, offset, flags.token))
    return _POOLS[key]
