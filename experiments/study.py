"""Does MAE pretraining help? A laptop-scale study on SynthHumans in the regime where it should:
pretraining on many unlabelled images, fine-tuning on a small labelled subset.

    python -m experiments.study            # the committed study (about an hour on 2 CPU cores)
    python -m experiments.study --quick    # seg and pose only, smaller (about 15 min)
    python -m experiments.study --smoke    # a few steps of everything (the tests)

Steps:
1. Render an unlabelled pool of SynthHumans images (images only: they cost nothing to label or store)
   and a small labelled subset (the first images of the same stream, with every label) plus a
   validation split.
2. MAE-pretrain the demo ViT on the pool (``experiment=pretrain_demo``).
3. Fine-tune every task on the labelled subset from the MAE checkpoint and from random initialisation,
   in two arms: ``full`` (everything trains, the default recipe) and ``frozen``
   (``task.freeze_backbone=true``: only the head trains, a probe of what the features hold), each with
   several seeds (``seed=`` moves the head initialisation and the data order).
4. Write ``<out-dir>/README.md``: per arm and task, the mean and standard deviation over seeds of the
   final validation metric for each initialisation and whether MAE is ahead by more than two standard
   deviations, per-seed values, validation curves, the MAE loss curve and reconstructions.

Every run is an ordinary ``python train.py ...`` (printed; output in ``<runs-dir>/logs/``), two at a
time with one thread each. Finished runs are reused when the study is run again.
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
from experiments.launch import Job, run_jobs
from experiments.study_report import StudyRun, write_report

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("pose", "seg", "depth", "normal")
ARMS = ("full", "frozen")
INITS = ("mae", "random")


@dataclass
class Budget:
    """Sizes of one study (``DEFAULT``, ``QUICK`` and ``SMOKE`` below)."""

    pool_images: int  # unlabelled images for MAE
    labelled_images: int  # the labelled fine-tuning subset (the pool's first images)
    val_images: int
    generator_size: tuple[int, int]  # (H, W) of the rendered images
    pretrain_steps: int
    finetune_steps: int  # per fine-tune, both arms
    finetune_batch: int
    val_every: int  # steps between validations (a nominal epoch)
    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    jobs: int = 2  # runs side by side
    model: str | None = None  # a conf/model name for every run (None: the demo presets' vit_small)
    style: str = "simple"  # SynthHumans scene style (the demo's: what the small ViT learns in minutes)
    pretrain_extra: list[str] = field(default_factory=list)
    finetune_extra: list[str] = field(default_factory=list)


DEFAULT = Budget(
    pool_images=4000,
    labelled_images=200,
    val_images=100,
    generator_size=(256, 192),
    pretrain_steps=3000,
    finetune_steps=400,
    finetune_batch=16,
    val_every=100,
)
QUICK = replace(DEFAULT, pool_images=2000, pretrain_steps=1000, tasks=("seg", "pose"), finetune_steps=200)
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
    pretrain_extra=[
        "model=vit_tiny",
        "task.image_size=[64,48]",
        "data.batch_size=4",
        "data.epoch_length=3",
        "task.callbacks.reconstruction.every_n_steps=1",
    ],
    finetune_extra=["model=vit_tiny", "task.image_size=[64,48]", "task.num_pictures=0"],
)


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
        f"trainer.max_steps={budget.finetune_steps}",
        f"data.batch_size={budget.finetune_batch}",
        f"data.epoch_length={budget.val_every}",
        "trainer.limit_val_batches=null",
        "validate_after_fit=false",  # the last nominal epoch ends on the last step and validates
        *budget.finetune_extra,
    ]


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seg and pose only, smaller (about 15 min)")
    size.add_argument("--smoke", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "study")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: <runs-dir>/datasets")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm and init (>= 2)")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side")
    parser.add_argument("--model", default=None, help="conf/model name for every run, e.g. sapiens2_tiny")
    args = parser.parse_args(argv)

    budget = SMOKE if args.smoke else QUICK if args.quick else DEFAULT
    if args.tasks:
        budget = replace(budget, tasks=tuple(args.tasks))
    if args.seeds is not None:
        if args.seeds < 2:
            parser.error("--seeds must be at least 2 (a standard deviation needs two)")
        budget = replace(budget, seeds=tuple(range(args.seeds)))
    if args.jobs is not None:
        budget = replace(budget, jobs=args.jobs)
    if args.model is not None:  # replaces any model= of the budget (the smoke study's vit_tiny)
        model = [f"model={args.model}"]
        budget = replace(
            budget,
            model=args.model,
            pretrain_extra=[a for a in budget.pretrain_extra if not a.startswith("model=")] + model,
            finetune_extra=[a for a in budget.finetune_extra if not a.startswith("model=")] + model,
        )
    runs_dir = args.runs_dir.resolve()
    data_dir = (args.data_dir or runs_dir / "datasets").resolve()
    out_dir = args.out_dir.resolve()
    command = shlex.join(["python", "-m", "experiments.study", *argv])
    env = {"WANDB_MODE": "disabled"}
    common = [
        f"paths.output_dir={runs_dir}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=10",
    ]

    start = time.perf_counter()
    phases: dict[str, dict[str, float]] = {}
    data = build_data(budget, data_dir)
    phases["data (SynthHumans shards)"] = {"wall": time.perf_counter() - start, "cpu": 0.0}

    timings_path = runs_dir / "timings.json"
    done = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def launch(jobs: list[Job], phase: str) -> None:
        """Run the jobs not finished in an earlier invocation; record wall and CPU time."""
        todo = [j for j in jobs if j.name not in done or not (j.run_dir / "metrics.csv").exists()]
        for job in jobs:
            if job not in todo:
                print(f"reusing the finished run {job.run_dir}", flush=True)
        t0 = time.perf_counter()
        run_jobs(todo, parallel=budget.jobs, env=env, stop_on_failure=False)
        for job in todo:
            if job.ok:
                done[job.name] = {"wall": job.wall_s, "cpu": job.cpu_s}
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(done, indent=1))
        phases[phase] = {
            "wall": time.perf_counter() - t0,
            "cpu": sum(done.get(j.name, {}).get("cpu", 0.0) for j in jobs),
        }

    pretrain_dir = runs_dir / "pretrain" / "mae"
    pretrain = Job(
        "pretrain/mae",
        [
            "experiment=pretrain_demo",
            *common,
            "run_name=mae",
            f"data.train_shards={data['pool']}/shards/pretrain/train",
            f"data.val_shards={data['pool']}/shards/pretrain/val",
            f"trainer.max_steps={budget.pretrain_steps}",
            *budget.pretrain_extra,
        ],
        runs_dir / "logs" / "pretrain_mae.log",
        pretrain_dir,
        budget.pretrain_steps,
    )
    launch([pretrain], "MAE pretraining")
    ckpt = pretrain_dir / "checkpoints" / "last.ckpt"

    runs = [
        StudyRun(task, arm, init, seed, runs_dir / task / f"{arm}_{init}_s{seed}")
        for arm in ARMS
        for task in budget.tasks
        for init in INITS
        for seed in budget.seeds
    ]
    for arm in ARMS:
        jobs = []
        for run in (r for r in runs if r.arm == arm):
            init_ckpt = ckpt if run.init == "mae" else None
            jobs.append(
                Job(
                    f"{run.task}/{run.name}",
                    [*finetune_args(budget, data, run, init_ckpt), *common],
                    runs_dir / "logs" / f"{run.task}_{run.name}.log",
                    run.run_dir,
                    budget.finetune_steps,
                )
            )
        launch(jobs, f"fine-tune, {arm} arm ({len(jobs)} runs)")
        write_report(out_dir, runs, pretrain_dir, phases, budget, command)

    total_cpu = sum(p["cpu"] for p in phases.values())
    phases["total"] = {"wall": time.perf_counter() - start, "cpu": total_cpu}
    readme = write_report(out_dir, runs, pretrain_dir, phases, budget, command)
    print(f"\nStudy finished in {(time.perf_counter() - start) / 60:.1f} min: {readme}")
    failed = [r.name for r in runs if not (r.run_dir / "metrics.csv").exists()]
    if failed:
        print(f"runs without results: {', '.join(failed)} (see {runs_dir / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
