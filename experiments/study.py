"""Does pretraining help, and which objective? A laptop-scale study on SynthHumans in the regime where it
should: pretraining on many unlabelled images, fine-tuning on a small labelled subset.

    python -m experiments.study            # the committed study, all four tasks
    python -m experiments.study --quick    # seg and pose only, smaller
    python -m experiments.study --smoke    # a few steps of everything (the tests)
    python -m experiments.study --inits mae random   # without the self-distillation arm

Without the self-distillation arm the default (the demo's 8-pixel ViT, all four tasks, 3 seeds, bf16 where
the CPU has it natively) took 52 minutes on 2 CPU cores (101 CPU-minutes) and ``--quick`` (seg and pose, fewer
steps) 12 minutes; that arm
adds a pretraining at about 2.9x MAE's CPU time per step (README, Benchmarks, demo shape), run beside MAE's,
and half as many fine-tunes again.

Steps:
1. Render an unlabelled pool of SynthHumans images (images only: they cost nothing to label or store)
   and a small labelled subset (the first images of the same stream, with every label) plus a
   validation split.
2. Pretrain the demo ViT on the pool once per pretraining objective (``--inits``), the two side by side:
   MAE (``experiment=pretrain_demo``, run ``pretrain/mae``) and MAE + self-distillation from an EMA
   teacher (``experiment=pretrain_distill_demo``, run ``pretrain_distill/distill``), same shards and steps.
3. Fine-tune every task on the labelled subset from each pretraining checkpoint (the distillation's EMA
   teacher, ``task.init_weights=teacher`` by default) and from random initialisation, in two arms:
   ``full`` (everything trains, the default recipe) and ``frozen`` (``task.freeze_backbone=true``: only
   the head trains, a probe of what the features hold), each with several seeds (``seed=`` moves the head
   initialisation and the data order). Run ``<task>/<arm>_<init>_s<seed>``.
4. Write ``<out-dir>/README.md``: per arm and task, the mean and standard deviation over seeds of the
   final validation metric for each initialisation, how far each pretraining is ahead of random
   initialisation (and self-distillation of MAE) in standard deviations, whether that exceeds two,
   per-seed values, validation curves, the pretraining losses and reconstructions, time per phase.

Every run is an ordinary ``python train.py ...`` (printed; output in ``<runs-dir>/logs/``), two at a
time with one thread each. Finished runs are reused when the study is run again, so adding an init to a
finished study runs only that pretraining and its fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from data.synthhumans.shards import build_split
from experiments.baselines import yardsticks
from experiments.demo import BASELINE_FIT_BATCHES
from experiments.launch import PRECISIONS, Job, resolve_precision, run_jobs, thread_args
from experiments.study_report import BASELINE, OBJECTIVES, TRIVIAL, StudyRun, write_report

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("pose", "seg", "depth", "normal")
ARMS = ("full", "frozen")
INITS = tuple(OBJECTIVES)  # mae, distill, random
PHASE_WALLS = "_phase_wall_s"  # key in timings.json: phase -> wall seconds over every invocation
DATA_PHASE = "data (SynthHumans shards)"


@dataclass
class Budget:
    """Sizes of one study (``DEFAULT``, ``QUICK`` and ``SMOKE`` below)."""

    pool_images: int  # unlabelled images for pretraining
    labelled_images: int  # the labelled fine-tuning subset (the pool's first images)
    val_images: int
    generator_size: tuple[int, int]  # (H, W) of the rendered images
    pretrain_steps: int  # per pretraining objective
    finetune_steps: int  # per fine-tune of the full arm (and of the frozen arm unless frozen_steps)
    finetune_batch: int
    val_every: int  # steps between validations (a nominal epoch)
    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    inits: tuple[str, ...] = INITS  # pretraining objectives, plus random initialisation (always)
    jobs: int = 2  # runs side by side
    model: str | None = "vit_small"  # a conf/model name for every run (None: the demo presets' model)
    study_heads: bool = True  # STUDY_HEADS (16-pixel patches); False: the demo presets' heads (8-pixel)
    log_every: int = 10  # trainer.log_every_n_steps of every run
    style: str = "simple"  # SynthHumans scene style (the demo's: what the small ViT learns in minutes)
    pretrain_extra: list[str] = field(default_factory=list)
    finetune_extra: list[str] = field(default_factory=list)
    frozen_steps: int | None = None  # per fine-tune of the frozen arm (None: finetune_steps)

    def steps(self, arm: str) -> int:
        """Fine-tuning steps of one run of ``arm`` (``full`` or ``frozen``)."""
        return self.frozen_steps if arm == "frozen" and self.frozen_steps is not None else self.finetune_steps


DEFAULT = Budget(  # the demo's recipe: 8-pixel patches (16x12 tokens at 128x96) and the presets' heads
    pool_images=4000,
    labelled_images=50,
    val_images=100,
    generator_size=(256, 192),
    pretrain_steps=3000,
    finetune_steps=300,
    finetune_batch=16,
    val_every=100,
    model="vit_small_p8",
    study_heads=False,
    # A probe trains only its head on fixed features, at about 0.6x a full step's CPU time. At 300 steps
    # every frozen curve was still falling; frozen normals, MAE against random: +0.31 deg (+1.4 std) after
    # 300 steps, +1.10 deg (+9.5 std) after 900 (experiments/study/README.md, Findings).
    frozen_steps=600,
)
QUICK = replace(  # seg and pose only, fewer pretraining and fine-tuning steps, to fit about 15 minutes
    DEFAULT,
    pool_images=1500,
    labelled_images=100,  # as measured (experiments/study/quick); the default's 50 is untested here
    pretrain_steps=800,
    tasks=("seg", "pose"),
    finetune_steps=120,
    frozen_steps=240,  # twice the full arm's, as the default (120 frozen steps left frozen seg at +0.8)
    val_every=40,
)
SMOKE = Budget(
    pool_images=16,
    labelled_images=8,
    val_images=4,
    generator_size=(64, 48),
    pretrain_steps=3,
    finetune_steps=2,
    finetune_batch=4,
    val_every=2,
    tasks=("pose", "seg"),
    seeds=(0, 1),
    model="vit_tiny",
    log_every=1,  # the pretrainings' training curves and the teacher's health in 3 steps
    pretrain_extra=[
        "task.image_size=[64,48]",
        "data.batch_size=4",
        "data.epoch_length=3",
        "task.callbacks.reconstruction.every_n_steps=1",
    ],
    finetune_extra=["task.image_size=[64,48]", "task.num_pictures=0"],
)


# Heads for the 16-pixel patches of ``vit_small`` (``--heads study``; the smoke study and the committed
# 16-pixel report, experiments/study/patch16_quick). The demo presets' heads, which the default and
# ``--quick`` use, are for 8-pixel patches (one stride-2 block fewer per head, no 1x1 convs in the seg head).
STUDY_HEADS = {
    "pose": ["task.task_head.deconv_channels=[64,64]"],
    "seg": ["task.task_head.deconv_channels=[32,32,32]", "task.task_head.conv_channels=[32,32,32]"],
    "depth": ["task.task_head.deconv_channels=[32,32,32,32]"],
    "normal": ["task.task_head.deconv_channels=[64,64,64]"],
}


def model_args(budget: Budget) -> list[str]:
    """The ``model=`` override of every run ([] keeps the presets' model)."""
    return [f"model={budget.model}"] if budget.model else []


def finetune_args(budget: Budget, data: dict[str, Path], run: StudyRun, ckpt: Path | None) -> list[str]:
    """train.py overrides of one fine-tune: the task's demo recipe on the labelled subset."""
    return [
        f"experiment={run.task}_demo",
        f"run_name={run.name}",
        f"seed={run.seed}",
        f"task.init_from={ckpt if ckpt is not None else 'null'}",
        f"task.freeze_backbone={str(run.arm == 'frozen').lower()}",
        f"data.train_shards={data['labelled']}/shards/{run.task}/train",
        f"data.val_shards={data['pool']}/shards/{run.task}/val",
        f"trainer.max_steps={budget.steps(run.arm)}",
        f"data.batch_size={budget.finetune_batch}",
        f"data.epoch_length={budget.val_every}",
        "trainer.limit_val_batches=null",
        "validate_after_fit=false",  # the last nominal epoch ends on the last step and validates
        *thread_args(budget.jobs),
        *model_args(budget),
        *(STUDY_HEADS[run.task] if budget.study_heads else []),
        *budget.finetune_extra,
    ]


def pretrain_job(
    budget: Budget, data: dict[str, Path], init: str, runs_dir: Path, common: list[str], side_by_side: int = 1
) -> Job:
    """The ``init`` objective's pretraining on the unlabelled pool (run ``<runs-dir>/<task name>/<init>``),
    one of ``side_by_side`` pretrainings that share the cores."""
    preset = OBJECTIVES[init][1]
    task_name = "pretrain" if init == "mae" else f"pretrain_{init}"  # train.py files runs under task.name
    return Job(
        f"pretrain/{init}",
        [
            f"experiment={preset}",
            *common,
            f"run_name={init}",
            f"data.train_shards={data['pool']}/shards/pretrain/train",
            f"data.val_shards={data['pool']}/shards/pretrain/val",
            f"trainer.max_steps={budget.pretrain_steps}",
            *thread_args(min(side_by_side, budget.jobs)),
            *model_args(budget),
            *budget.pretrain_extra,
        ],
        runs_dir / "logs" / f"pretrain_{init}.log",
        runs_dir / task_name / init,
        budget.pretrain_steps,
    )


def build_data(budget: Budget, data_dir: Path) -> dict[str, Path]:
    """The unlabelled pool (+ labelled val split) and the labelled subset; returns both roots."""
    h, w = budget.generator_size
    pool, labelled = data_dir / "pool", data_dir / "labelled"
    opts = {"progress": False, "workers": 2, "style": budget.style, "max_people": 2}
    build_split(pool, "train", budget.pool_images, 0, h, w, readers=("pretrain",), **opts)
    build_split(pool, "val", budget.val_images, 1_000_003, h, w, **opts)
    # Same seed and indices as the pool: the labelled images are the pool's first images.
    build_split(labelled, "train", budget.labelled_images, 0, h, w, **opts)
    return {"pool": pool, "labelled": labelled}


def trivial_baselines(runs: list[StudyRun]) -> list[tuple[str, str, float]]:
    """(task, what it predicts, score) rows: each task's trivial baseline (``experiments.baselines``: mean
    pose, most frequent class, constant depth, mean normal) and, for depth, the harder image-independent
    mean training depth map, scored on the study's validation set with the first finished run of the task
    (every run of a task shares its data and transforms)."""
    rows, done = [], set()
    for run in runs:
        if run.task in done or not (run.run_dir / "metrics.csv").exists():
            continue
        done.add(run.task)
        for i, (what, value) in enumerate(yardsticks(run.task, run.run_dir, BASELINE_FIT_BATCHES)):
            rows.append((run.task, TRIVIAL[run.task] if i == 0 else what, value))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seg and pose only, smaller")
    size.add_argument("--smoke", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "study")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: <runs-dir>/datasets")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm and init (>= 2)")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side")
    parser.add_argument("--model", default=None, help="conf/model name for every run, e.g. sapiens2_tiny")
    parser.add_argument(
        "--heads",
        choices=["study", "presets"],
        default=None,
        help="study: STUDY_HEADS, for 16-pixel patches (--smoke; --model vit_small); presets: the demo "
        "presets' heads, for 8-pixel patches (the default study and --quick); default: the budget's",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="every run's trainer.precision; auto (default): bf16-mixed where the CPU has native bf16 "
        "matmuls (about 1.5x faster there), else 32-true",
    )
    parser.add_argument(
        "--inits",
        nargs="+",
        choices=INITS,
        default=list(INITS),
        help="initialisations to compare: mae (MAE pretraining), distill (MAE + self-distillation), "
        "random (always included: everything is compared against it); default: all three",
    )
    args = parser.parse_args(argv)
    if not set(args.inits) - {BASELINE}:
        parser.error("--inits: name at least one pretraining (mae, distill) to compare with random")

    budget = SMOKE if args.smoke else QUICK if args.quick else DEFAULT
    if args.tasks:
        budget = replace(budget, tasks=tuple(args.tasks))
    budget = replace(budget, inits=tuple(i for i in INITS if i in args.inits or i == BASELINE))
    if args.seeds is not None:
        if args.seeds < 2:
            parser.error("--seeds must be at least 2 (a standard deviation needs two)")
        budget = replace(budget, seeds=tuple(range(args.seeds)))
    if args.jobs is not None:
        budget = replace(budget, jobs=args.jobs)
    if args.model is not None:  # replaces the budget's model (the smoke study's vit_tiny)
        budget = replace(budget, model=args.model)
    if args.heads is not None:
        budget = replace(budget, study_heads=args.heads == "study")
    runs_dir = args.runs_dir.resolve()
    data_dir = (args.data_dir or runs_dir / "datasets").resolve()
    out_dir = args.out_dir.resolve()
    command = shlex.join(["python", "-m", "experiments.study", *argv])
    precision = resolve_precision(args.precision)
    env = {"WANDB_MODE": "disabled"}
    common = [
        f"paths.output_dir={runs_dir}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"trainer.log_every_n_steps={budget.log_every}",
        f"trainer.precision={precision}",
    ]

    start = time.perf_counter()
    timings_path = runs_dir / "timings.json"
    done = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    walls = done.setdefault(PHASE_WALLS, {})  # phase -> wall seconds summed over every invocation
    phases: dict[str, dict[str, float]] = {}
    data = build_data(budget, data_dir)
    walls[DATA_PHASE] = walls.get(DATA_PHASE, 0.0) + time.perf_counter() - start
    phases[DATA_PHASE] = {"wall": walls[DATA_PHASE], "cpu": 0.0}

    def launch(jobs: list[Job], phase: str | None = None) -> None:
        """Run the jobs not finished in an earlier invocation; record their wall and CPU time (and the
        phase's, when named)."""
        todo = [j for j in jobs if j.name not in done or not (j.run_dir / "metrics.csv").exists()]
        for job in jobs:
            if job not in todo:
                print(f"reusing the finished run {job.run_dir}", flush=True)
        t0 = time.perf_counter()
        run_jobs(todo, parallel=budget.jobs, env=env, stop_on_failure=False)
        for job in todo:
            if job.ok:
                done[job.name] = {"wall": job.wall_s, "cpu": job.cpu_s}
        if phase is not None:  # wall summed over invocations, so a rerun that reuses runs keeps it
            walls[phase] = walls.get(phase, 0.0) + time.perf_counter() - t0
            phases[phase] = {
                "wall": walls[phase],
                "cpu": sum(done.get(j.name, {}).get("cpu", 0.0) for j in jobs),
            }
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(done, indent=1))

    objectives = [init for init in budget.inits if init != BASELINE]
    pretrain_jobs = {
        init: pretrain_job(budget, data, init, runs_dir, common, len(objectives)) for init in objectives
    }
    launch(list(pretrain_jobs.values()))
    for init, job in pretrain_jobs.items():  # side by side: one phase each, from the job's own times
        phases[f"{OBJECTIVES[init][0]} pretraining"] = done.get(job.name, {"wall": 0.0, "cpu": 0.0})
    pretrain_dirs = {init: job.run_dir for init, job in pretrain_jobs.items()}
    ckpts = {init: run_dir / "checkpoints" / "last.ckpt" for init, run_dir in pretrain_dirs.items()}
    for init, ckpt in ckpts.items():
        if not ckpt.exists():
            print(f"no checkpoint from the {init} pretraining ({ckpt}): its fine-tunes are skipped")

    runs = [
        StudyRun(task, arm, init, seed, runs_dir / task / f"{arm}_{init}_s{seed}")
        for arm in ARMS
        for task in budget.tasks
        for init in budget.inits
        for seed in budget.seeds
    ]
    for arm in ARMS:
        jobs = []
        for run in (r for r in runs if r.arm == arm):
            init_ckpt = ckpts.get(run.init)
            if init_ckpt is not None and not init_ckpt.exists():
                continue
            jobs.append(
                Job(
                    f"{run.task}/{run.name}",
                    [*finetune_args(budget, data, run, init_ckpt), *common],
                    runs_dir / "logs" / f"{run.task}_{run.name}.log",
                    run.run_dir,
                    budget.steps(run.arm),
                )
            )
        # One name per arm whatever the invocation runs, so a study grown in steps sums its walls.
        launch(jobs, f"fine-tune, {arm} arm")
        write_report(out_dir, runs, pretrain_dirs, phases, budget, command, precision=precision)

    total_cpu = sum(p["cpu"] for p in phases.values())
    pretraining = [p["wall"] for name, p in phases.items() if name.endswith(" pretraining")]
    others = [p["wall"] for name, p in phases.items() if not name.endswith(" pretraining")]
    # The pretrainings run side by side: the longest is their wall time.
    phases["total"] = {"wall": sum(others) + max(pretraining, default=0.0), "cpu": total_cpu}
    readme = write_report(
        out_dir, runs, pretrain_dirs, phases, budget, command, trivial_baselines(runs), precision
    )
    print(f"\nStudy finished in {(time.perf_counter() - start) / 60:.1f} min: {readme}")
    failed = [f"{r.task}/{r.name}" for r in runs if not (r.run_dir / "metrics.csv").exists()]
    if failed:
        print(f"runs without results: {', '.join(failed)} (see {runs_dir / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
