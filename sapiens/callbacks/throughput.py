"""Throughput (images/s, tokens/s) and corrupt-sample counts, logged on Lightning's logging steps."""

from __future__ import annotations

import time

import lightning as L
import torch


class ThroughputMonitor(L.Callback):
    """Logs ``perf/images_per_s`` and ``perf/tokens_per_s`` over the whole job (all ranks), averaged
    over the training batches since the previous logging step, and ``data/skipped_samples``: the
    running total of corrupt samples the shard pipeline skipped (``batch["num_skipped"]``), summed
    over ranks at log time.

    Nothing is read from or copied to the device between logging steps (``self.log`` of a Python
    number is a host->device copy, and the skipped count arrives on the device with the batch): the
    count is summed on the device and the rates are computed on the host, both logged only when
    Lightning writes logs (every ``trainer.log_every_n_steps``).

    Args:
        warmup_steps: steps ignored at the start (compilation, worker start-up).
    """

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self._seen = 0
        self._window_start: float | None = None
        self._window_images = 0
        self._window_tokens = 0
        self.skipped: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._seen == self.warmup_steps:  # the window starts when the warm-up steps are over
            self._window_start = time.perf_counter()
        if "num_skipped" in batch:
            count = torch.as_tensor(batch["num_skipped"]).sum()
            self.skipped = count if self.skipped is None else self.skipped + count.to(self.skipped.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        if self._window_start is not None:
            images = batch["image"].shape[0] * trainer.world_size
            self._window_images += images
            tokens_fn = getattr(pl_module, "tokens_per_image", None)
            if tokens_fn is not None:
                self._window_tokens += images * tokens_fn(batch["image"])
        # Lightning writes step metrics only every log_every_n_steps; the predicate is equal on every
        # rank, so all ranks join the same reductions.
        if not trainer._logger_connector.should_update_logs:
            return
        now = time.perf_counter()
        if self._window_start is not None and self._window_images:
            dt = max(now - self._window_start, 1e-9)
            pl_module.log("perf/images_per_s", self._window_images / dt, on_step=True, rank_zero_only=True)
            if self._window_tokens:
                tokens = self._window_tokens / dt
                pl_module.log("perf/tokens_per_s", tokens, on_step=True, rank_zero_only=True)
            self._window_start, self._window_images, self._window_tokens = now, 0, 0
        total = self.skipped if self.skipped is not None else torch.zeros((), device=pl_module.device)
        total = total.float().to(pl_module.device)
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        pl_module.log("data/skipped_samples", total, on_step=True, rank_zero_only=True)
