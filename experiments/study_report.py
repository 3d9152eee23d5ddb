"""The study's report: each pretraining against random initialisation (and self-distillation against MAE),
mean and standard deviation over seeds, separation, per-seed table, curves.

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

from experiments.demo import MAIN_METRICS, last_value  # MAIN_METRICS: task -> column, label, higher
from experiments.study_plots import plot_curves, plot_pretrain_loss

ROOT = Path(__file__).resolve().parents[1]
FINDINGS_MARKER = "<!-- findings: text below this line is kept when the study is rerun -->"
SEPARATION = 2.0  # a pretraining must lead by more than this many standard deviations
BASELINE = "random"  # the init every pretraining is compared against
# init -> (what it is, its pretraining preset; None for random initialisation)
OBJECTIVES = {
    "mae": ("MAE", "pretrain_demo"),
    "distill": ("MAE + self-distillation", "pretrain_distill_demo"),
    BASELINE: ("random initialisation", None),
}
# task -> what its trivial baseline predicts (experiments.baselines, fitted on the training shards)
TRIVIAL = {
    "pose": "the mean pose",
    "seg": "the most frequent class",
    "depth": "one constant depth per image",
    "normal": "the mean normal",
}


@dataclass
class StudyRun:
    """One fine-tune: ``task`` in ``arm`` (full | frozen) from ``init`` (an ``OBJECTIVES`` key), ``seed``."""

    task: str
    arm: str
    init: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm}_{self.init}_s{self.seed}"


@dataclass
class Comparison:
    """``init`` against ``baseline`` for one (arm, task): per-seed finals, mean, std and the separation."""

    arm: str
    task: str
    values: list[float]  # final metric of the ``init`` runs, one per seed
    baseline_values: list[float]
    init: str = "mae"
    baseline: str = BASELINE

    @property
    def higher_is_better(self) -> bool:
        return MAIN_METRICS[self.task][2]

    @staticmethod
    def stats(values: list[float]) -> tuple[float, float]:
        return mean(values), (stdev(values) if len(values) > 1 else float("nan"))

    @property
    def gain(self) -> float:
        """How far ``init`` is ahead of ``baseline`` (positive = better, in the metric's units)."""
        diff = mean(self.values) - mean(self.baseline_values)
        return diff if self.higher_is_better else -diff

    @property
    def separation(self) -> float:
        """The gain in units of the larger of the two seed standard deviations."""
        spread = max(self.stats(self.values)[1], self.stats(self.baseline_values)[1])
        if spread == 0:
            return float("inf") if self.gain > 0 else float("-inf") if self.gain < 0 else 0.0
        return self.gain / spread

    @property
    def separated(self) -> bool:
        return len(self.values) > 1 and len(self.baseline_values) > 1 and self.separation > SEPARATION


def finals(runs: list[StudyRun]) -> dict[tuple[str, str, str], list[float]]:
    """(arm, task, init) -> the final validation metric of each finished seed."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        value = last_value(r.run_dir, MAIN_METRICS[r.task][0])
        if value is not None:
            out.setdefault((r.arm, r.task, r.init), []).append(value)
    return out


def compare(runs: list[StudyRun]) -> list[Comparison]:
    """Per (arm, task): every pretrained init against random initialisation, then self-distillation against
    MAE; only pairs with at least one finished run on each side."""
    values = finals(runs)
    inits = list(dict.fromkeys(r.init for r in runs))
    pairs = [(i, BASELINE) for i in inits if i != BASELINE]
    if "mae" in inits and "distill" in inits:
        pairs.append(("distill", "mae"))
    out = []
    for arm in dict.fromkeys(r.arm for r in runs):
        for task in dict.fromkeys(r.task for r in runs):
            for init, base in pairs:
                ours, theirs = values.get((arm, task, init)), values.get((arm, task, base))
                if ours and theirs:
                    out.append(Comparison(arm, task, ours, theirs, init, base))
    return out


def hardware(out_dir: Path | None = None) -> dict[str, str]:
    """CPU count, CPU model, torch version and git commit of this checkout (uncommitted changes flagged,
    except in ``out_dir``: the report being written)."""
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
    exclude = []
    if out_dir is not None and out_dir.resolve().is_relative_to(ROOT):
        exclude = [f":(exclude){out_dir.resolve().relative_to(ROOT)}"]
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", *exclude):
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


def summary_rows(runs: list[StudyRun]) -> list[str]:
    """The main table: per (arm, task) one row per init, random first; each pretrained init against random
    initialisation and, when both ran, self-distillation against MAE."""
    values = finals(runs)
    by_pair = {(c.arm, c.task, c.init, c.baseline): c for c in compare(runs)}
    inits = list(dict.fromkeys(r.init for r in runs))
    inits.sort(key=lambda i: i != BASELINE)
    versus_mae = "mae" in inits and "distill" in inits
    header = ["arm", "task", "metric", "init", "mean ± std", "ahead of random", "in std", "> 2 std"]
    header += ["ahead of mae", "in std"] if versus_mae else []
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in dict.fromkeys(r.arm for r in runs):
        for task in dict.fromkeys(r.task for r in runs):
            if not any(c.arm == arm and c.task == task for c in by_pair.values()):
                continue  # nothing to compare yet
            for init in inits:
                if (arm, task, init) not in values:
                    continue
                cells = [arm, task, MAIN_METRICS[task][1], init, _pm(values[(arm, task, init)])]
                for base in [BASELINE, "mae"] if versus_mae else [BASELINE]:
                    c = by_pair.get((arm, task, init, base))
                    cells += [f"{c.gain:+.4f}", f"{c.separation:+.1f}"] if c else ["", ""]
                    if base == BASELINE:  # the verdict the study is about
                        cells.append(("yes" if c.separated else "no") if c else "")
                rows.append("| " + " | ".join(cells) + " |")
    return rows


def pretraining_rows(pretrain_dirs: dict[str, Path], budget) -> list[str]:
    """One row per pretraining: preset, steps, final val/loss, and the teacher's health for distillation."""
    teacher = "distill" in pretrain_dirs
    rows = [
        "| init | objective | preset | steps | final val/loss |"
        + (" teacher: cls entropy, KL to centre |" if teacher else ""),
        "|---|---|---|---|---|" + ("---|" if teacher else ""),
    ]
    for init, run_dir in pretrain_dirs.items():
        label, preset = OBJECTIVES[init]
        val = last_value(run_dir, "val/loss")
        shown = "missing" if val is None else f"{val:.4f}"
        row = f"| {init} | {label} | `experiment={preset}` | {budget.pretrain_steps} | {shown} |"
        if teacher:
            entropy, kl = (
                last_value(run_dir, "distill/cls_entropy"),
                last_value(run_dir, "distill/cls_kl_center"),
            )
            row += f" {entropy:.3f} nats, {kl:.4f} |" if entropy is not None and kl is not None else "  |"
        rows.append(row)
    return rows


def trivial_rows(trivial: list[tuple[str, str, float]]) -> list[str]:
    """One row per (task, what the baseline predicts, its score on the validation set)."""
    rows = ["| task | metric | trivial baseline | value |", "|---|---|---|---|"]
    for task, what, value in trivial:
        rows.append(f"| {task} | {MAIN_METRICS[task][1]} | {what} | {value:.4f} |")
    return rows


def per_seed_rows(runs: list[StudyRun]) -> list[str]:
    """Every run's final metric and val/loss ("missing" for a run without results)."""
    rows = [
        "| arm | task | init | seed | metric | final | val/loss | run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        column = MAIN_METRICS[r.task][0]
        value, loss = last_value(r.run_dir, column), last_value(r.run_dir, "val/loss")
        shown = "missing" if value is None else f"{value:.4f}"
        shown_loss = "missing" if loss is None else f"{loss:.4f}"
        rows.append(
            f"| {r.arm} | {r.task} | {r.init} | {r.seed} | {column} | {shown} | {shown_loss} "
            f"| `{r.run_dir.name}` |"
        )
    return rows


def write_report(
    out_dir: Path,
    runs: list[StudyRun],
    pretrain_dirs: dict[str, Path],
    phases: dict[str, dict[str, float]],
    budget,
    command: str,
    trivial: list[tuple[str, str, float]] | None = None,
    precision: str = "32-true",
) -> Path:
    """Write ``out_dir/README.md``, ``curves.png``, ``pretrain_loss.png`` and ``<init>_reconstructions.png``
    (the last reconstruction picture of each pretraining in ``pretrain_dirs``: init -> run directory).
    ``trivial``: (task, baseline, score on the same validation set) rows, shown under the table;
    ``precision``: every run's ``trainer.precision``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out_dir / "curves.png")
    names = {init: OBJECTIVES[init][0] for init in pretrain_dirs}
    plot_pretrain_loss(pretrain_dirs, out_dir / "pretrain_loss.png", names)
    reconstructions = []
    for init, run_dir in pretrain_dirs.items():
        pictures = sorted((run_dir / "reconstructions").glob("step_*.png"))
        if pictures:
            shutil.copyfile(pictures[-1], out_dir / f"{init}_reconstructions.png")
            label = OBJECTIVES[init][0]
            reconstructions += [
                f"![{label} reconstructions: original | masked | reconstruction]({init}_reconstructions.png)",
                "",
            ]
    pretrained = [OBJECTIVES[i][0] for i in pretrain_dirs]
    versus_mae = {"mae", "distill"} <= set(pretrain_dirs)
    h, w = budget.generator_size
    full, frozen = budget.steps("full"), budget.steps("frozen")
    arm_steps = f"{full} steps" if full == frozen else f"{full} steps (the frozen arm {frozen})"
    lines = [
        f"# Pretraining ({'; '.join(pretrained)}) vs random initialisation on SynthHumans "
        "(laptop-scale study)",
        "",
        "Generated by `experiments/study.py`; every number is read from the runs' `metrics.csv` (final "
        f"validation). Mean ± standard deviation over {len(budget.seeds)} seeds (`seed=` moves the head "
        "initialisation and the data order; each pretraining checkpoint is the same for every seed). "
        "*ahead of random* is in the metric's units (positive = better); *in std* divides it by the larger "
        "of the two standard deviations; a pretraining beats random initialisation beyond noise when that "
        f"exceeds {SEPARATION:g}."
        + (" *ahead of mae* compares self-distillation with MAE the same way." if versus_mae else ""),
        "",
        *summary_rows(runs),
        "",
        "Higher is better for OKS AP and mIoU, lower for depth RMSE and the mean normal angle. "
        "`full`: the whole model trains; `frozen`: `task.freeze_backbone=true`, only the head trains. "
        "Inits: `random` (no pretraining), `mae` (`experiment=pretrain_demo`)"
        + (
            ", `distill` (MAE + self-distillation from an EMA teacher, `experiment=pretrain_distill_demo`; "
            "fine-tuned from its teacher, `task.init_weights=teacher`)."
            if "distill" in pretrain_dirs
            else "."
        ),
        "",
        *(
            [
                "What a model scores without learning anything from the image, on the same validation "
                "set (`experiments/baselines.py`, constants fitted on the training shards):",
                "",
                *trivial_rows(trivial),
                "",
            ]
            if trivial
            else []
        ),
        "![validation curves](curves.png)",
        "",
        "## Pretraining",
        "",
        f"Each objective on the same {budget.pool_images} unlabelled images. val/loss is the masked-pixel "
        "reconstruction loss (norm-pix MSE on masked patches, fixed masks) for every objective, so the rows "
        "compare."
        + (
            " The distillation's own terms and health signals are in its `metrics.csv` (`train/loss_cls`, "
            "`train/loss_patch`, `distill/*`); the teacher column is its last logged `distill/cls_entropy` "
            "and `distill/cls_kl_center` (a KL near 0 means a collapsed teacher)."
            if "distill" in pretrain_dirs
            else ""
        ),
        "",
        *pretraining_rows(pretrain_dirs, budget),
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        *reconstructions,
        "## Setup",
        "",
        f"- SynthHumans `{budget.style}` scenes rendered at {h}x{w}: {budget.pool_images} unlabelled "
        "pool images, the first "
        f"{budget.labelled_images} of them labelled for fine-tuning, {budget.val_images} validation images",
        f"- model `{budget.model or 'vit_small'}` (`conf/model`) in every run; heads: "
        + ("`STUDY_HEADS` (`experiments/study.py`)" if budget.study_heads else "the demo presets'"),
        f"- `trainer.precision={precision}` in every run (`--precision auto`: bf16 autocast where the CPU "
        "multiplies bf16 natively, else fp32)",
        f"- pretraining: {budget.pretrain_steps} steps per objective",
        f"- fine-tuning: `experiment=<task>_demo` recipes, {arm_steps} of batch {budget.finetune_batch}, "
        f"validation every {budget.val_every} steps; only `task.init_from`, `task.freeze_backbone`, `seed` "
        "and the arm's steps differ between runs",
        "",
        "## Per seed",
        "",
        *per_seed_rows(runs),
        "",
        "## Reproduce",
        "",
        f"```\n{command}\n```",
        "",
        "`--inits` chooses the pretrainings (`mae distill random`, the default; random initialisation is "
        "always run). Finished runs are reused, so adding an init to a finished study runs only its "
        "pretraining and fine-tunes.",
        "",
        "## Hardware and software",
        "",
        *(f"- {k}: {v}" for k, v in hardware(out_dir).items()),
        "",
        "## Time per phase",
        "",
        "Wall time is what the shared machine gave; CPU time (user + sys of the runs) is the fairer figure. "
        "The pretrainings run side by side, so their wall times overlap; a reused pretraining shows the "
        "time it took when it ran, and a fine-tune phase sums the wall time of every invocation that ran "
        "it (a study grown in steps, or resumed, counts each step; `timings.json` in the runs folder).",
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
