"""Fault injection for tests: a callback that makes the training process SIGKILL itself, and a
pickle payload that runs code when unpickled (a crafted checkpoint).

Added to a run through the config, e.g. ``+callbacks.fault._target_=tests.faults.KillSelf
+callbacks.fault.after_save=step_0000006.ckpt``: train.py runs from the repository root, so this
module imports like any callback. SIGKILL cannot be caught, so what is left on disk is exactly what a
``kill -9``, an OOM kill or a node failure at that point leaves.
"""

from __future__ import annotations

import builtins
import os
import signal
import time
from pathlib import Path

import lightning as L


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the signal is delivered asynchronously; never return into training


class KillSelf(L.Callback):
    """SIGKILL this process at a chosen point of training.

    Args:
        after_save: right after the checkpoint file with this name has been written (renamed into
            place), before anything else: e.g. between ``step_N.ckpt`` and ``last.ckpt``.
        at_step: at the end of the training batch after which ``global_step`` equals this, before
            any checkpoint of that step is written and before the batch's metrics are logged.
    """

    def __init__(self, after_save: str | None = None, at_step: int | None = None):
        self.after_save = after_save
        self.at_step = at_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.after_save:
            return
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_then_die(checkpoint, path, storage_options=None):
            save(checkpoint, path, storage_options)
            if Path(path).name == self.after_save:
                _die()

        io.save_checkpoint = save_then_die

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at_step is not None and trainer.global_step == self.at_step:
            _die()


class RunsCode:
    """Put into a checkpoint, unpickling it calls ``exec``, which writes ``marker``: proof that
    loading the checkpoint ran code from it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))
