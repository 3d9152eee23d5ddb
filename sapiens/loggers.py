"""Loggers: wandb online when an API key is configured (offline otherwise), and a CSV logger that
appends to metrics.csv when a run resumes."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        group=group,
        tags=list(tags or []),
        id=run_id,
        mode=mode,
        **kwargs,
    )


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and appends, so a
    resumed run's metrics.csv holds the whole history."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing ``<save_dir>/metrics.csv`` and appending to it when a run resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
