"""Checkpoint housekeeping: ModelCheckpoint's ``save_top_k`` promise kept after crashes, the run's
records made consistent with the state a resumed run restored, and the final state always saved.

Lightning writes a new top-k checkpoint, then ``last.ckpt``, then deletes the checkpoint that fell out
of the top k; a kill in between leaves a file that no restored state knows about, so Lightning never
deletes it. Lightning also never deletes the file a run resumed from. After 19 kills with
``save_top_k=2`` a run directory held 12 step files (25 GB each at 2B parameters). And a run whose
``max_steps`` is not a multiple of ``every_n_train_steps`` ends without saving its last steps. So:

- after a restore (``on_train_start``): the ``metrics.csv`` rows logged after the checkpoint
  (``step >= its global step``: the resumed run logs those steps again) and the hpc checkpoints older
  than the restored checkpoint go;
- whenever a ModelCheckpoint's top-k set changes, and at the start and end of training: the files of
  its filename pattern that are in no callback's top k, are not ``last``, and are not newer than the
  current step go (a newer one is left alone: it did not load when the run resumed, see
  :mod:`sapiens.resume`);
- at the end of training, ``last.ckpt`` is written if it does not hold the final step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sapiens.resume import checkpoint_step, drop_hpc_older_than

log = logging.getLogger(__name__)


def filename_regex(callback: ModelCheckpoint) -> re.Pattern:
    """The names ``callback`` gives its top-k files (``step_{step:07d}`` -> ``step_(?P<step>\\d+)``,
    with Lightning's ``-vN`` version suffix and ``.ckpt`` extension)."""
    template = callback.filename or "{epoch}-{step}"
    out = ""
    for part in re.split(r"(\{[^}]*\})", template):
        if not (part.startswith("{") and part.endswith("}")):
            out += re.escape(part)
            continue
        name = part[1:-1].split(":")[0]
        prefix = re.escape(name.replace("/", "_") + "=") if callback.auto_insert_metric_name else ""
        out += prefix + (r"(?P<step>\d+)" if name == "step" and "?P<step>" not in out else r"[^/]+?")
    return re.compile(f"^{out}(?:-v\\d+)?{re.escape(callback.FILE_EXTENSION)}$")


class CheckpointHousekeeping(L.Callback):
    """See the module docstring. Acts on global rank 0; deletion goes through the strategy, which
    also removes DeepSpeed checkpoint folders."""

    def __init__(self):
        self._seen: dict[int, frozenset[str]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path and trainer.is_global_zero:
            step = trainer.global_step
            for logger in trainer.loggers:
                if hasattr(logger, "discard_from_step"):
                    logger.discard_from_step(step)
            kept = Path(trainer.ckpt_path)
            for path in drop_hpc_older_than(trainer.default_root_dir, step, keep=kept):
                log.info("deleted %s: older than the restored checkpoint %s", path, kept)
        self._sweep(trainer, force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sweep(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sweep(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            saved = getattr(callback, "_last_global_step_saved", None)  # the same on every rank
            if isinstance(callback, ModelCheckpoint) and callback.save_last and saved != trainer.global_step:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(path, weights_only=False)  # every rank: DeepSpeed saves collectively
                log.info("saved %s at the final step %d", path, trainer.global_step)
        self._sweep(trainer, force=True)

    def _sweep(self, trainer: L.Trainer, force: bool = False) -> None:
        callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        state = {id(c): frozenset(c.best_k_models) for c in callbacks}
        if not force and state == self._seen:
            return
        self._seen = state
        if not trainer.is_global_zero:
            return
        held = [p for c in callbacks for p in (*c.best_k_models, c.best_model_path, c.last_model_path) if p]
        keep = {str(Path(p).resolve()) for p in held}
        for callback in callbacks:
            if callback.save_top_k < 0:
                continue  # keeps everything
            for path in self._stale(callback, keep, trainer.global_step):
                log.info(
                    "deleting %s: not among the top %d of its checkpoint callback", path, callback.save_top_k
                )
                trainer.strategy.remove_checkpoint(path)

    @staticmethod
    def _stale(callback: ModelCheckpoint, keep: set[str], step: int) -> list[Path]:
        folder = Path(callback.dirpath)
        if not folder.is_dir():
            return []
        pattern, stale = filename_regex(callback), []
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if match is None or str(path.resolve()) in keep:
                continue
            try:
                held = int(match.group("step")) if "step" in match.groupdict() else checkpoint_step(path)
            except ValueError:
                continue  # unreadable: not ours to judge
            if held <= step:
                stale.append(path)
        return stale
