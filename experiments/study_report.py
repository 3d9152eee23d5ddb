"""The study's report: mean and standard deviation over seeds, separation, per-seed table, curves.

Every number is read from the runs' ``metrics.csv``; ``write_report`` can be called at any time (a
partial study gives a partial table) and keeps the hand-written findings below ``FINDINGS_MARKER``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")  # files only; no display on a CPU box or in tests
import matplotlib.pyplot as plt  # noqa: E402

from experiments.demo import MAIN_METRICS  # noqa: E402  (task -> column, label, higher is better)
from experiments.report import read_metrics_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINDINGS_MARKER = "<!-- findings: text below this line is kept when the study is rerun -->"
SEPARATION = 2.0  # MAE must lead by more than this many standard deviations


@dataclass
class StudyRun:
    """One fine-tune: ``task`` in ``arm`` (full | frozen) from ``init`` (mae | random) with ``seed``."""

    task: str
    arm: str
    init: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm}_{self.init}_s{self.seed}"


def series(run_dir: Path, column: str) -> list[tuple[int, float]]:
    """[(step, value)] of ``column`` in ``run_dir/metrics.csv`` ([] when absent)."""
    path = run_dir / "metrics.csv"
    return read_metrics_csv(path).get(column, []) if path.exists() else []


def final(run_dir: Path, column: str) -> float | None:
    """The last validation's value of ``column`` (None when the run has none)."""
    values = series(run_dir, column)
    return values[-1][1] if values else None


@dataclass
class Comparison:
    """MAE vs random init for one (arm, task): per-seed finals, mean, std and the separation."""

    arm: str
    task: str
    mae: list[float]
    random: list[float]

    @property
    def higher_is_better(self) -> bool:
        return MAIN_METRICS[self.task][2]

    def stats(self, values: list[float]) -> tuple[float, float]:
        return mean(values), (stdev(values) if len(values) > 1 else float("nan"))

    @property
    def gain(self) -> float:
        """How far MAE is ahead (positive = better, in the metric's units)."""
        diff = mean(self.mae) - mean(self.random)
        return diff if self.higher_is_better else -diff

    @property
    def separation(self) -> float:
        """The gain in units of the larger of the two seed standard deviations."""
        spread = max(self.stats(self.mae)[1], self.stats(self.random)[1])
        if spread == 0:
            return float("inf") if self.gain > 0 else float("-inf") if self.gain < 0 else 0.0
        return self.gain / spread

    @property
    def separated(self) -> bool:
        return len(self.mae) > 1 and len(self.random) > 1 and self.separation > SEPARATION


def compare(runs: list[StudyRun]) -> list[Comparison]:
    """One Comparison per (arm, task) with at least one finished run per init."""
    out = []
    for arm in dict.fromkeys(r.arm for r in runs):
        for task in dict.fromkeys(r.task for r in runs):
            column = MAIN_METRICS[task][0]
            values = {
                init: [
                    v
                    for r in runs
                    if (r.arm, r.task, r.init) == (arm, task, init)
                    for v in [final(r.run_dir, column)]
                    if v is not None
                ]
                for init in ("mae", "random")
            }
            if values["mae"] and values["random"]:
                out.append(Comparison(arm, task, values["mae"], values["random"]))
    return out


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
            for init, color in (("mae", "tab:blue"), ("random", "tab:orange")):
                mine = [r for r in runs if (r.arm, r.task, r.init) == (arm, task, init)]
                curves = [c for c in (series(r.run_dir, column) for r in mine) if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                steps = [s for s, _ in curves[0][:length]]
                rows = [[v for _, v in c[:length]] for c in curves]
                mu = [mean(col) for col in zip(*rows, strict=True)]
                sd = [stdev(col) if len(col) > 1 else 0.0 for col in zip(*rows, strict=True)]
                ax.plot(steps, mu, color=color, label=init, linewidth=1.2)
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


def plot_pretrain_loss(pretrain_dir: Path, path: Path) -> None:
    """MAE train/loss (line) and val/loss (dots) vs step."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    train = series(pretrain_dir, "train/loss")
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.0)
    val = series(pretrain_dir, "val/loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o", label="val", ms=3)
    ax.set_title("MAE loss (norm-pix MSE on masked patches)", fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def hardware() -> dict[str, str]:
    """CPU count, CPU model, torch version and git commit of this checkout."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    commit = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (plus uncommitted changes in the working tree)"
    return {
        "CPU cores (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model,
        "torch": version("torch"),
        "git commit": commit,
    }


def _pm(values: list[float]) -> str:
    sd = f" ± {stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean(values):.4f}{sd}"


def summary_rows(comparisons: list[Comparison]) -> list[str]:
    """The main table: one row per (arm, task)."""
    rows = [
        "| arm | task | metric | MAE init | random init | MAE ahead by | in std | > 2 std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        label = MAIN_METRICS[c.task][1]
        rows.append(
            f"| {c.arm} | {c.task} | {label} | {_pm(c.mae)} | {_pm(c.random)} | {c.gain:+.4f} | "
            f"{c.separation:+.1f} | {'yes' if c.separated else 'no'} |"
        )
    return rows


def write_report(
    out_dir: Path,
    runs: list[StudyRun],
    pretrain_dir: Path,
    phases: dict[str, dict[str, float]],
    budget,
    command: str,
) -> Path:
    """Write ``out_dir/README.md``, ``curves.png``, ``pretrain_loss.png`` and the reconstructions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out_dir / "curves.png")
    plot_pretrain_loss(pretrain_dir, out_dir / "pretrain_loss.png")
    pictures = sorted((pretrain_dir / "reconstructions").glob("step_*.png"))
    if pictures:
        shutil.copyfile(pictures[-1], out_dir / "mae_reconstructions.png")
    comparisons = compare(runs)
    per_seed = [
        "| arm | task | init | seed | metric | final | val/loss | run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        column = MAIN_METRICS[r.task][0]
        value, loss = final(r.run_dir, column), final(r.run_dir, "val/loss")
        shown = "missing" if value is None else f"{value:.4f}"
        shown_loss = "missing" if loss is None else f"{loss:.4f}"
        per_seed.append(
            f"| {r.arm} | {r.task} | {r.init} | {r.seed} | {column} | {shown} | {shown_loss} "
            f"| `{r.run_dir.name}` |"
        )
    pre_val = series(pretrain_dir, "val/loss")
    h, w = budget.generator_size
    lines = [
        "# MAE pretraining vs random initialisation on SynthHumans (laptop-scale study)",
        "",
        "Generated by `experiments/study.py`; every number is read from the runs' `metrics.csv` (final "
        f"validation). Mean ± standard deviation over {len(budget.seeds)} seeds (`seed=` moves the head "
        "initialisation and the data order; the MAE checkpoint is the same for every seed). "
        "*MAE ahead by* is in the metric's units (positive = better); *in std* divides it by the larger "
        "of the two standard deviations; MAE beats random init beyond noise when that exceeds "
        f"{SEPARATION:g}.",
        "",
        *summary_rows(comparisons),
        "",
        "Higher is better for OKS AP and mIoU, lower for depth RMSE and the mean normal angle. "
        "`full`: the whole model trains; `frozen`: `task.freeze_backbone=true`, only the head trains.",
        "",
        "![validation curves](curves.png)",
        "",
        "## Pretraining",
        "",
        f"MAE on {budget.pool_images} unlabelled images, {budget.pretrain_steps} steps "
        f"(`experiment=pretrain_demo`); final val/loss {pre_val[-1][1]:.4f}."
        if pre_val
        else "MAE pretraining: no validation logged.",
        "",
        "![MAE loss](pretrain_loss.png)",
        "",
        "![MAE reconstructions: original | masked | reconstruction](mae_reconstructions.png)",
        "",
        "## Setup",
        "",
        f"- SynthHumans `{budget.style}` scenes rendered at {h}x{w}: {budget.pool_images} unlabelled "
        "pool images, the first "
        f"{budget.labelled_images} of them labelled for fine-tuning, {budget.val_images} validation images",
        f"- model `{budget.model or 'vit_small'}` (`conf/model`) in every run",
        f"- fine-tuning: `experiment=<task>_demo` recipes, {budget.finetune_steps} steps of batch "
        f"{budget.finetune_batch}, validation every {budget.val_every} steps; only `task.init_from`, "
        "`task.freeze_backbone` and `seed` differ between runs",
        "",
        "## Per seed",
        "",
        *per_seed,
        "",
        "## Reproduce",
        "",
        f"```\n{command}\n```",
        "",
        "## Hardware and software",
        "",
        *(f"- {k}: {v}" for k, v in hardware().items()),
        "",
        "## Time per phase",
        "",
        "Wall time is what the shared machine gave; CPU time (user + sys of the runs) is the fairer figure.",
        "",
        "| phase | wall minutes | CPU minutes |",
        "|---|---|---|",
        *(f"| {name} | {t['wall'] / 60:.1f} | {t['cpu'] / 60:.1f} |" for name, t in phases.items()),
        "",
        FINDINGS_MARKER,
        "",
    ]
    readme = out_dir / "README.md"
    kept = ""
    if readme.exists() and FINDINGS_MARKER in readme.read_text():
        kept = readme.read_text().split(FINDINGS_MARKER, 1)[1].strip()
    readme.write_text("\n".join(lines) + (kept + "\n" if kept else ""))
    return readme
