"""Checkpoint IO that never leaves a half-written file under a checkpoint's final name, nor a partial
``.tmp`` behind when the write fails (a full disk is reported as such, naming the file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sapiens.disk import no_space_error

TMP_SUFFIX = ".tmp"  # a checkpoint being written is `<name>.tmp` until it is complete


class _RecordingFile:
    """A file wrapper that keeps the first OSError of ``write``: torch's zip writer turns it into a
    RuntimeError ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp``, fsync, then rename over ``path`` (atomic on POSIX).

    A crash mid-write leaves the previous file intact (and a stray ``.tmp``, overwritten next time);
    a failed write removes its ``.tmp``. A full disk raises ``OSError(ENOSPC, "no space left on
    <mount> (<device>) while writing <path>")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    recording = None
    try:
        with open(tmp, "wb") as f:
            recording = _RecordingFile(f)
            torch.save(obj, recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else getattr(recording, "error", None)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(path, cause) from None
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with :func:`atomic_torch_save`; loading is unchanged."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)
