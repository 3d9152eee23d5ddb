"""Does MAE pretraining help? A laptop-scale study on SynthHumans, rerun with one command on CPU.

    python -m experiments.study            # full study (~40 min on 2 CPU cores)
    python -m experiments.study --quick    # a few steps of everything (~1 min; used by the tests)
    python -m experiments.study --model vit_tiny --out-dir experiments/study/vit_tiny \
        --runs-dir runs/study_vit_tiny     # the second model size

Steps: build SynthHumans shards, MAE-pretrain a small ViT, fine-tune pose / seg / depth / normal from
(a) the MAE checkpoint and (b) random initialisation with the same budget and seed, then write
``<out-dir>/README.md`` (table of main metrics read from each run's ``metrics.csv``, hardware, git
commit, command, wall time per phase) and loss-curve PNGs. Every training run is an ordinary
``python train.py ...`` subprocess whose output goes to ``<runs-dir>/logs/<run>.log``.

Extra pretraining variants (e.g. another mask ratio) add one init column each:
``--variant mask50=task.mask_ratio=0.5`` pretrains with that override and fine-tunes from it too.
Pretraining objectives (arms): ``--pretrain mae distill`` pretrains with MAE and with masked reconstruction
+ self-distillation (``task=pretrain_distill``), at the same budget, and fine-tunes from each.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a CPU box or in tests
import matplotlib.pyplot as plt  # noqa: E402

from data.synthhumans.shards import build  # noqa: E402
from experiments.demo import MAIN_METRICS  # noqa: E402  (task -> column, label, higher is better)
from experiments.report import read_metrics_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = tuple(MAIN_METRICS)
# pretraining arm -> (experiment preset, task name = its run folder under <runs-dir>)
PRETRAIN_ARMS = {
    "mae": ("pretrain_demo", "pretrain"),
    "distill": ("pretrain_distill_demo", "pretrain_distill"),
}
FINDINGS_MARKER = "<!-- findings: text below this line is kept when the study is rerun -->"


@dataclass
class StudyRun:
    """One training run of the study: ``task`` (or "pretrain") started from ``init``."""

    task: str
    init: str  # "mae", "random" or "mae_<variant>"
    run_dir: Path
    ok: bool
    seconds: float
    overrides: list[str] = field(default_factory=list)


@dataclass
class Budget:
    """Sizes of one study: model, data and steps (``full`` and ``quick`` presets below)."""

    model: str
    image_size: tuple[int, int]  # (H, W) of pretraining and fine-tuning inputs
    train_images: int
    val_images: int
    generator_size: tuple[int, int]  # (H, W) of the generated SynthHumans images
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    epoch_length: int  # batches between validations
    val_batches: int
    num_workers: int
    log_every: int = 5  # train/loss is logged every this many steps
    pretrain_extra: list[str] = field(default_factory=list)  # overrides of the MAE runs
    finetune_extra: list[str] = field(default_factory=list)  # overrides of the fine-tunes


FULL = Budget(
    model="vit_small",
    image_size=(128, 96),
    train_images=800,
    val_images=120,
    generator_size=(256, 192),
    pretrain_steps=800,
    pretrain_batch=32,
    finetune_steps=200,
    finetune_batch=16,
    epoch_length=50,
    val_batches=8,  # 120 val images / 16 = 8 batches: the whole split
    num_workers=2,
)
QUICK = Budget(
    model="vit_tiny",
    image_size=(64, 48),
    train_images=12,
    val_images=4,
    generator_size=(64, 48),
    pretrain_steps=3,
    pretrain_batch=4,
    finetune_steps=3,
    finetune_batch=4,
    epoch_length=3,
    val_batches=1,
    num_workers=0,
    log_every=1,
    # one validation per run (the last step is a nominal epoch end): no second one after fitting
    pretrain_extra=["validate_after_fit=false", "task.callbacks.reconstruction.every_n_steps=1000"],
    finetune_extra=["task.num_pictures=0", "validate_after_fit=false"],
)


def run_train(
    args: list[str], run_dir: Path, log_path: Path, env: dict[str, str], timings: Path
) -> tuple[bool, float]:
    """``python train.py *args`` with output in ``log_path``; returns (succeeded, seconds).

    A run that already finished in an earlier invocation (its time is in ``timings``, a JSON file
    name -> seconds, and its last checkpoint exists) is not run again: its recorded time is returned.
    """
    done = json.loads(timings.read_text()) if timings.exists() else {}
    key = str(run_dir)
    if key in done and (run_dir / "checkpoints" / "last.ckpt").exists():
        print(f"reusing the finished run {run_dir} ({done[key]:.0f} s)", flush=True)
        return True, done[key]
    cmd = [sys.executable, "train.py", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd[1:])}  > {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    print(
        f"  {'ok' if code == 0 else f'FAILED (exit {code}; see {log_path})'} in {seconds:.0f} s", flush=True
    )
    if code == 0:
        done[key] = seconds
        timings.write_text(json.dumps(done, indent=1))
    return code == 0, seconds


def common_overrides(budget: Budget, data_dir: Path, runs_dir: Path) -> list[str]:
    """Overrides shared by every run of the study: paths, model, image size, logging, validation."""
    h, w = budget.image_size
    return [
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={runs_dir}",
        f"model={budget.model}",
        f"task.image_size=[{h},{w}]",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"data.epoch_length={budget.epoch_length}",
        f"data.num_workers={budget.num_workers}",
        f"trainer.limit_val_batches={budget.val_batches}",
        f"trainer.log_every_n_steps={budget.log_every}",
        "seed=0",
    ]


def pretrain_args(
    budget: Budget, name: str, overrides: list[str], experiment: str = "pretrain_demo"
) -> list[str]:
    """train.py arguments of the pretraining run ``name`` (``experiment``: the arm's preset, MAE by default);
    ``overrides`` win over the budget."""
    base = [
        f"experiment={experiment}",
        f"run_name={name}",
        f"trainer.max_steps={budget.pretrain_steps}",
        f"data.batch_size={budget.pretrain_batch}",
    ]
    replaced = {o.split("=", 1)[0] for o in overrides}  # Hydra refuses a key given twice
    return [a for a in base if a.split("=", 1)[0] not in replaced] + overrides


def finetune_args(budget: Budget, task: str, init: str, ckpt: Path | None) -> list[str]:
    """train.py arguments of fine-tuning ``task`` from ``ckpt`` (None = random initialisation)."""
    return [
        f"experiment={task}_demo",
        f"run_name={init}",
        f"trainer.max_steps={budget.finetune_steps}",
        f"data.batch_size={budget.finetune_batch}",
        f"task.init_from={ckpt if ckpt is not None else 'null'}",
    ]


def metric_summary(run_dir: Path, column: str, higher_is_better: bool) -> tuple[float, float] | None:
    """(best, final) of ``column`` over the validations in ``run_dir/metrics.csv``; None if absent."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    values = [v for _, v in read_metrics_csv(path).get(column, [])]
    if not values:
        return None
    return (max(values) if higher_is_better else min(values)), values[-1]


def loss_series(run_dir: Path, column: str = "train/loss") -> list[tuple[int, float]]:
    """[(step, value)] of ``column`` in ``run_dir/metrics.csv`` ([] when the run has none)."""
    path = run_dir / "metrics.csv"
    return read_metrics_csv(path).get(column, []) if path.exists() else []


def plot_finetune_losses(runs: list[StudyRun], tasks: list[str], path: Path) -> None:
    """One panel per task: train/loss vs step, one line per init, saved as a small PNG."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for run in (r for r in runs if r.task == task):
            series = loss_series(run.run_dir)
            if series:
                ax.plot(*zip(*series, strict=True), label=run.init, linewidth=1.2)
        ax.set_title(f"{task} train/loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_pretrain_losses(runs: list[StudyRun], path: Path) -> None:
    """MAE train/loss (lines) and val/loss (dots) vs step for every pretraining run."""
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for run in (r for r in runs if r.task == "pretrain"):
        train = loss_series(run.run_dir, "train/loss_mae") or loss_series(
            run.run_dir
        )  # distill: its MAE term
        if train:
            (line,) = ax.plot(*zip(*train, strict=True), label=f"{run.init} train", linewidth=1.2)
            val = loss_series(run.run_dir, "val/loss")
            if val:
                ax.plot(*zip(*val, strict=True), "o", color=line.get_color(), label=f"{run.init} val", ms=3)
    ax.set_title("MAE pretraining loss (norm-pix MSE on masked patches)", fontsize=8)
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


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


def write_report(
    out_dir: Path,
    runs: list[StudyRun],
    phases: dict[str, float],
    budget: Budget,
    command: str,
    tasks: list[str],
) -> Path:
    """Write ``out_dir/README.md`` and the loss PNGs from the runs' ``metrics.csv``; returns README."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_finetune_losses(runs, tasks, out_dir / "finetune_loss.png")
    plot_pretrain_losses(runs, out_dir / "pretrain_loss.png")
    lines = [
        "# MAE pretraining vs random initialisation on SynthHumans (laptop-scale study)",
        "",
        "Generated by `experiments/study.py`; every number below is read from the runs' "
        "`metrics.csv`. best = best over all validations of the run (every "
        f"{budget.epoch_length} steps), final = the last validation. val/loss (the task's "
        "training loss on the validation split) is shown too: it still separates runs where the "
        "main metric is saturated at 0 (e.g. OKS AP of a barely trained pose head).",
        "",
        "| task | metric | init | best | final | final val/loss | run |",
        "|---|---|---|---|---|---|---|",
    ]
    comparison = []
    for task in tasks:
        column, label, higher = MAIN_METRICS[task]
        finals: dict[str, dict[str, float | None]] = {column: {}, "val/loss": {}}
        for run in (r for r in runs if r.task == task):
            summary = metric_summary(run.run_dir, column, higher)
            best, final = summary if summary else (None, None)
            loss = metric_summary(run.run_dir, "val/loss", False)
            finals[column][run.init] = final
            finals["val/loss"][run.init] = loss[1] if loss else None
            status = "" if run.ok else " (run failed)"
            lines.append(
                f"| {task} | {column} | {run.init} | {fmt(best)} | {fmt(final)} | "
                f"{fmt(loss[1] if loss else None)} | `{run.run_dir.name}`{status} |"
            )
        for name, up in ((column, higher), ("val/loss", False)):
            base = finals[name].get("random")
            for init, final in finals[name].items():
                if init == "random" or final is None or base is None:
                    continue
                # compare at the printed precision, so "better by 0.0000" cannot appear
                gain = round(final - base if up else base - final, 4)
                verdict = (
                    f"{'better' if gain > 0 else 'worse'} than random init by {abs(gain):.4f}"
                    if gain
                    else "equal to random init"
                )
                comparison.append(f"- {task} {name}: {init} is {verdict} ({final:.4f} vs {base:.4f})")
    pre = [r for r in runs if r.task == "pretrain"]
    lines += [
        "",
        "Lower is better for val/rmse and val/mean_angular_error, higher for val/AP and val/mIoU.",
        "",
        "## MAE init vs random init (final validation)",
        "",
        *(comparison or ["- not enough finished runs to compare"]),
        "",
        "## Pretraining",
        "",
    ]
    for run in pre:
        val = loss_series(run.run_dir, "val/loss")
        extra = f" with `{' '.join(run.overrides)}`" if run.overrides else ""
        steps = next(
            (o.split("=", 1)[1] for o in run.overrides if o.startswith("trainer.max_steps=")),
            budget.pretrain_steps,
        )
        lines.append(
            f"- `{run.init}`{extra}: {steps} steps, final val/loss {fmt(val[-1][1] if val else None)}"
        )
    h, w = budget.image_size
    lines += [
        "",
        "![MAE loss](pretrain_loss.png)",
        "",
        "![fine-tuning loss](finetune_loss.png)",
        "",
        "## Setup",
        "",
        f"- model `{budget.model}`, inputs {h}x{w}, SynthHumans {budget.train_images} train / "
        f"{budget.val_images} val images",
        f"- MAE: {budget.pretrain_steps} steps, batch {budget.pretrain_batch} "
        "(`experiment=pretrain_demo` recipe)",
        f"- fine-tuning: {budget.finetune_steps} steps, batch {budget.finetune_batch}, seed 0 for "
        "every run (`experiment=<task>_demo` recipes); only `task.init_from` differs",
        "",
        "## Reproduce",
        "",
        f"```\n{command}\n```",
        "",
        "## Hardware and software",
        "",
        *(f"- {k}: {v}" for k, v in hardware().items()),
        "",
        "## Wall time per phase",
        "",
        "The machine was shared with other jobs, so the timings are noisy.",
        "",
        "| phase | minutes |",
        "|---|---|",
        *(f"| {name} | {sec / 60:.1f} |" for name, sec in phases.items()),
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


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"mask50=task.mask_ratio=0.5,trainer.max_steps=2000"`` -> ("mask50", [overrides])."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.isidentifier() or not rest:
        raise ValueError(
            f"--variant {spec!r}: expected NAME=override[,override...], e.g. mask50=task.mask_ratio=0.5"
        )
    return name, [o for o in rest.split(",") if o]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "experiments" / "study",
        help="where README.md and the PNGs are written",
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=ROOT / "runs" / "study", help="where the training runs are written"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where SynthHumans is generated (default: <runs-dir>/datasets)",
    )
    parser.add_argument("--model", default=None, help="model config (default vit_small; or vit_tiny)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--pretrain",
        nargs="+",
        default=["mae"],
        choices=list(PRETRAIN_ARMS),
        help="pretraining objectives to compare (each fine-tuned): mae, distill (MAE + self-distillation)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="an extra pretraining (e.g. mask50=task.mask_ratio=0.5), also fine-tuned",
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]

    budget = QUICK if args.quick else FULL
    if args.model is not None:
        budget.model = args.model
    if args.pretrain_steps is not None:
        budget.pretrain_steps = args.pretrain_steps
    if args.finetune_steps is not None:
        budget.finetune_steps = args.finetune_steps
    runs_dir = args.runs_dir.resolve()
    data_dir = (args.data_dir or runs_dir / "datasets").resolve()
    out_dir = args.out_dir.resolve()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = shlex.join(["python", "-m", "experiments.study", *argv])

    phases: dict[str, float] = {}
    runs: list[StudyRun] = []
    start = time.perf_counter()
    gh, gw = budget.generator_size
    build(
        data_dir / "synthhumans", budget.train_images, budget.val_images, height=gh, width=gw, progress=False
    )
    phases["data (SynthHumans shards)"] = time.perf_counter() - start

    common = common_overrides(budget, data_dir, runs_dir)
    timings = runs_dir / "timings.json"

    def report() -> None:
        write_report(out_dir, runs, phases, budget, command, tasks=args.tasks)

    pretrainings = [(arm, arm, []) for arm in args.pretrain] + [(f"mae_{n}", "mae", o) for n, o in variants]
    for index, (init, arm, overrides) in enumerate(pretrainings):
        experiment, task_name = PRETRAIN_ARMS[arm]
        run_dir = runs_dir / task_name / init
        ok, sec = run_train(
            pretrain_args(budget, init, [*common, *budget.pretrain_extra, *overrides], experiment),
            run_dir,
            runs_dir / "logs" / f"pretrain_{init}.log",
            env,
            timings,
        )
        phases[f"pretrain {init}"] = sec
        runs.append(StudyRun("pretrain", init, run_dir, ok, sec, overrides))
        report()
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        inits = [(init, ckpt)] + ([("random", None)] if index == 0 else [])
        for ft_init, ft_ckpt in inits:
            total = 0.0
            for task in args.tasks:
                if ft_ckpt is not None and not ckpt.exists():
                    runs.append(StudyRun(task, ft_init, runs_dir / task / ft_init, False, 0.0))
                    continue
                ok, sec = run_train(
                    [*finetune_args(budget, task, ft_init, ft_ckpt), *common, *budget.finetune_extra],
                    runs_dir / task / ft_init,
                    runs_dir / "logs" / f"{task}_{ft_init}.log",
                    env,
                    timings,
                )
                total += sec
                runs.append(StudyRun(task, ft_init, runs_dir / task / ft_init, ok, sec))
                report()
            phases[f"fine-tune x{len(args.tasks)} from {ft_init}"] = total
    # runs reused from an earlier invocation count with their recorded time
    phases["total"] = sum(phases.values())
    report()
    print(f"\nStudy finished in {(time.perf_counter() - start) / 60:.1f} min: {out_dir / 'README.md'}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
