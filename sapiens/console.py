"""Keep the console to what matters: third-party lines a user can do nothing about are silenced.

Silenced (each is printed by every run, and no setting of ours or the user's changes it):
- Lightning's "``srun`` is available but not used" hint, off Slurm only (inside a Slurm job it can
  point at a real mistake: several tasks asked for and ``srun`` not used);
- Lightning's "💡 Tip: ... litlogger / litmodels" advertisements;
- Lightning's warning that our LightningModule overrides ``on_after_batch_transfer`` next to a
  DataModule (on purpose: normalisation and the device-side resize run there);
- the "Total Flops" line and "FLOPs" column of the model summary, which stay 0 without an
  ``example_input_array``;
- "TPU available: False, using: 0 TPU cores".
Everything else (device lines, the model summary, Lightning's other warnings) is kept.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

_FLOPS_LINE = re.compile(r"^\s*0\s+Total Flops\s*$")


class _DropLines(logging.Filter):
    """Drops records starting with one of ``prefixes``; edits the model summary's zero-FLOPs lines."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.lstrip().startswith(self.prefixes):
            return False
        if "Total Flops" in message:
            record.msg, record.args = _without_zero_flops(message), None
        return True


def _without_zero_flops(summary: str) -> str:
    """The model summary table without its FLOPs column and total when no FLOPs were counted."""
    lines = summary.split("\n")
    if not any(_FLOPS_LINE.match(line) for line in lines):
        return summary
    lines = [line for line in lines if not _FLOPS_LINE.match(line)]
    header = next((line for line in lines if line.rstrip().endswith("| FLOPs")), None)
    if header is None:
        return "\n".join(lines)
    cut = header.rstrip().rindex(" | FLOPs")

    def trim(line: str) -> str:
        if " | " in line:  # a table row
            return line[:cut].rstrip()
        return line[: cut + 1] if line and set(line) == {"-"} else line  # a rule, or the totals

    return "\n".join(trim(line) for line in lines)


def quiet_third_party_noise() -> None:
    """Install the filters of the module docstring (idempotent)."""
    warnings.filterwarnings(
        "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in"
    )
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings(
            "ignore", message=r"The `srun` command is available on your system but is not used"
        )
    drop = _DropLines(("💡 Tip:", "TPU available: False"))
    for name in (
        "lightning.pytorch.utilities.rank_zero",  # where rank_zero_info logs (the module set last)
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.callbacks.model_summary",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(drop)
