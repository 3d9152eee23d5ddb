"""Throughput (images/s, tokens/s) and corrupt-sample counts, logged every step."""

from __future__ import annotations

import time

import lightning as L
import torch


class ThroughputMonitor(L.Callback):
    """Logs ``perf/images_per_s`` and ``perf/tokens_per_s`` over the whole job (all ranks), measured
    between consecutive training batches, and ``data/skipped_samples``: the running total of corrupt
    samples the shard pipeline skipped (``batch["num_skipped"]``), summed over ranks at log time.

    Args:
        warmup_steps: steps ignored at the start (compilation, worker start-up).
    """

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self._last: float | None = None
        self._seen = 0
        self.skipped = torch.zeros((), dtype=torch.long)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "num_skipped" in batch:
            self.skipped += torch.as_tensor(batch["num_skipped"]).sum().cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        images = batch["image"].shape[0] * trainer.world_size
        self._seen += 1
        if self._last is not None and self._seen > self.warmup_steps:
            dt = max(now - self._last, 1e-9)
            pl_module.log("perf/images_per_s", images / dt, on_step=True, rank_zero_only=True)
            tokens_fn = getattr(pl_module, "tokens_per_image", None)
            if tokens_fn is not None:
                tokens = images * tokens_fn(batch["image"])
                pl_module.log("perf/tokens_per_s", tokens / dt, on_step=True, rank_zero_only=True)
        # Lightning writes step metrics only every log_every_n_steps: sum over ranks just for those steps
        # (the same predicate Lightning uses; it is equal on every rank, so all join the same reductions).
        if trainer._logger_connector.should_update_logs:
            total = self.skipped.float()
            if trainer.world_size > 1:
                total = trainer.strategy.reduce(total.to(pl_module.device), reduce_op="sum")
            pl_module.log("data/skipped_samples", total, on_step=True, rank_zero_only=True)
        self._last = time.perf_counter()
