"""The study's pictures: validation curves per arm and task, and each pretraining's loss curves."""

from __future__ import annotations

from pathlib import Path
from statistics import mean, stdev
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display on a CPU box or in tests
import matplotlib.pyplot as plt  # noqa: E402

from experiments.demo import MAIN_METRICS  # noqa: E402  (task -> column, label, higher)
from experiments.report import read_metrics_csv  # noqa: E402

if TYPE_CHECKING:
    from experiments.study_report import StudyRun

COLORS = {"mae": "tab:blue", "distill": "tab:green", "random": "tab:orange"}  # one colour per init


def series(run_dir: Path, column: str) -> list[tuple[int, float]]:
    """[(step, value)] of ``column`` in ``run_dir/metrics.csv`` ([] when absent)."""
    path = run_dir / "metrics.csv"
    return read_metrics_csv(path).get(column, []) if path.exists() else []


def plot_curves(runs: list[StudyRun], path: Path) -> None:
    """Validation metric vs step, mean over seeds with a +-1 std band; rows = arms, columns = tasks."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    tasks = list(dict.fromkeys(r.task for r in runs))
    size = (3.0 * len(tasks), 2.4 * len(arms))
    fig, axes = plt.subplots(len(arms), len(tasks), figsize=size, squeeze=False)
    for i, arm in enumerate(arms):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            column, label, _ = MAIN_METRICS[task]
            for init in dict.fromkeys(r.init for r in runs):
                color = COLORS.get(init)
                mine = [r for r in runs if (r.arm, r.task, r.init) == (arm, task, init)]
                curves = [c for c in (series(r.run_dir, column) for r in mine) if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                steps = [s for s, _ in curves[0][:length]]
                rows = [[v for _, v in c[:length]] for c in curves]
                mu = [mean(col) for col in zip(*rows, strict=True)]
                sd = [stdev(col) if len(col) > 1 else 0.0 for col in zip(*rows, strict=True)]
                ax.plot(steps, mu, "o-", color=color, label=init, linewidth=1.2, ms=2)
                low = [m - s for m, s in zip(mu, sd, strict=True)]
                high = [m + s for m, s in zip(mu, sd, strict=True)]
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
            ax.set_title(f"{arm}: {task} {label}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(arms) - 1:
                ax.set_xlabel("step", fontsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_pretrain_loss(pretrain_dirs: dict[str, Path], path: Path, names: dict[str, str]) -> None:
    """One panel per pretraining, on a shared left axis: the masked-pixel reconstruction loss in training
    (train/loss, or its train/loss_mae term when the objective has others) and validation (val/loss, dots);
    an objective's total loss, when it differs, on the right axis. ``names``: init -> what it is."""
    n = max(1, len(pretrain_dirs))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 2.8), sharey=True, squeeze=False)
    for ax, (init, run_dir) in zip(axes[0], pretrain_dirs.items(), strict=False):
        total, term = series(run_dir, "train/loss"), series(run_dir, "train/loss_mae")
        handles = []
        if term or total:
            handles += ax.plot(*zip(*(term or total), strict=True), label="train", linewidth=1.0)
        val = series(run_dir, "val/loss")
        if val:
            handles += ax.plot(*zip(*val, strict=True), "o", label="val", ms=3)
        if term and total:
            right = ax.twinx()
            handles += right.plot(*zip(*total, strict=True), "--", color="grey", label="train total (right)")
            right.tick_params(labelsize=7)
        ax.set_title(f"{names[init]}: reconstruction loss", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if handles:
            ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
