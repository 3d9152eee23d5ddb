"""Loggers: wandb online when an API key is configured (offline otherwise), and a CSV logger that
appends to metrics.csv when a run resumes, writes every row as it is logged (a kill loses at most the
row being written) and drops the rows a resumed run logs again."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc holds credentials for api.wandb.ai (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_wandb_logger(
    mode: str = "auto",
    project: str = "sapiens-train",
    name: str | None = None,
    save_dir: str = ".",
    group: str | None = None,
    tags: list | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger whose run id is derived from the run directory, so a resumed run continues the
    same wandb run.

    Args:
        mode: ``auto`` (online with an API key, else offline), ``online``, ``offline`` or ``disabled``.
            The WANDB_MODE environment variable wins when set.
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode must be auto, online, offline or disabled, got {mode!r}")
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
    elif mode == "auto":
        mode = "online" if wandb_api_key_configured() else "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run_id = (name or "run").replace("/", "-")[-120:]
    logger = WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        group=group,
        tags=list(tags or []),
        id=run_id,
        mode=mode,
        **kwargs,
    )
    if logger._wandb_init.get("anonymous") is None:
        # Lightning passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning
        # on every run: nothing a user can act on.
        logger._wandb_init.pop("anonymous", None)
    return logger


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and appends, so a
    resumed run's metrics.csv holds the whole history. Rewrites (a new column, rows dropped on
    resume) go through a temporary file and a rename, so a kill never truncates the history."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)

    def _rewrite(self, fieldnames: list[str], keep=lambda row: True) -> int:
        """Rewrite metrics.csv with ``fieldnames``, keeping the rows ``keep`` accepts; returns how
        many rows were dropped."""
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if keep(row)]
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)
        return len(rows) - len(kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._rewrite(fieldnames)

    def discard_from_step(self, step: int) -> int:
        """Drop the rows with ``step >= step`` (written and pending); returns how many were dropped."""
        pending = len(self.metrics)
        self.metrics = [m for m in self.metrics if int(m.get("step", -1)) < step]
        dropped = pending - len(self.metrics)
        if os.path.isfile(self.metrics_file_path):
            dropped += self._rewrite(
                self.metrics_keys,
                keep=lambda row: row.get("step") in (None, "") or int(float(row["step"])) < step,
            )
        return dropped


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing ``<save_dir>/metrics.csv`` and appending to it when a run resumes.

    Rows are written as they are logged (``flush_logs_every_n_steps=1``: a few microseconds per step),
    so after a kill metrics.csv holds every step up to the checkpoint a rerun restores; the rerun then
    drops the rows logged after that checkpoint (:meth:`discard_from_step`, called by
    ``sapiens.callbacks.housekeeping.CheckpointHousekeeping``), which it logs again.
    """

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def discard_from_step(self, step: int) -> None:
        """Forget the rows logged at ``step`` or later (a resumed run at global step ``step`` logs
        them again)."""
        dropped = self.experiment.discard_from_step(step)
        if dropped:
            log.info(
                "metrics.csv: dropped %d rows logged after the restored checkpoint (step >= %d)",
                dropped,
                step,
            )
