"""`make demo`: SynthHumans -> MAE pretraining -> pose / seg / depth / normal fine-tunes -> metrics beside
trivial baselines, and pictures.

The demo data are SynthHumans ``simple`` scenes (plain backgrounds, calmer poses, one person per image;
see ``data.synthhumans.scene.SCENE_STYLES``): what a laptop-sized ViT learns from scratch in minutes.
The full scenes (clutter, textured backgrounds, up to three overlapping people, any pose) need a larger
model and hours (README, "What the demo shows").

Every step is an ordinary command you can run yourself (printed before it runs; its output goes to a log
under ``<output-dir>/logs/``). The fine-tunes run two at a time, one thread each: on two cores that is
faster than one run on two threads. The longest, seg, starts first and keeps one core while pose, depth
and normals take turns on the other (``LAUNCH_ORDER``). Re-running is cheap: the dataset is kept and
finished runs resume at their last step.
"""

from __future__ import annotations

import argparse
import csv
import errno
import shutil
import sys
import time
from pathlib import Path

from data.synthhumans.scene import SCENE_STYLES
from data.synthhumans.shards import build
from experiments.baselines import yardsticks
from experiments.launch import PRECISIONS, Job, resolve_precision, run_jobs, thread_args

ROOT = Path(__file__).resolve().parents[1]
# The baselines' constants (mean pose, class counts, mean normal) from this many training batches of 16:
# plenty for a mean, and reading every depth / normal shard would cost minutes.
BASELINE_FIT_BATCHES = 40
# task -> (metric column, label, higher is better)
MAIN_METRICS = {
    "pose": ("val/AP", "OKS AP", True),
    "seg": ("val/mIoU", "mIoU", True),
    "depth": ("val/rmse", "RMSE (aligned, m)", False),
    "normal": ("val/mean_angular_error", "mean angle (deg)", False),
}
# Longest first (CPU seconds at the presets' steps in bf16, fresh clone of 947c42d: seg 601, pose 361,
# normal 123, depth 107): seg keeps one core while the other three share the other, so both cores finish
# close together (613 s and 612 s of wall time there).
LAUNCH_ORDER = ("seg", "pose", "normal", "depth")
# Disk per rendered image with the demo's shards (raw float depth / normal / pointmap arrays and the
# shards; measured 6.6 GB for 3120 images at 256x192), with a margin.
BYTES_PER_IMAGE = 2.5e6


def build_data(args: argparse.Namespace, data_root: Path) -> bool:
    """Render the demo's SynthHumans split and write the shards of the pretraining and of ``args.tasks``.

    Returns False after a one-line error when the disk is (or would get) full."""
    images = args.train_images + args.val_images
    need = images * BYTES_PER_IMAGE
    disk = data_root if data_root.exists() else data_root.parent
    disk.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(disk).free
    advice = "free some space or pass --data-dir on a larger disk (or fewer --train-images)"
    if not (data_root / "shards").exists() and free < need:
        print(
            f"error: {images} demo images need about {need / 1e9:.1f} GB under {data_root}; "
            f"{free / 1e9:.1f} GB are free there: {advice}",
            file=sys.stderr,
        )
        return False
    try:
        build(
            data_root,
            args.train_images,
            args.val_images,
            workers=2,
            style=args.style,
            max_people=args.max_people,
            readers=("pretrain", *args.tasks),
        )
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: the disk filled up while writing {data_root} ({err}): {advice}", file=sys.stderr)
        return False
    return True


def last_value(run_dir: Path, column: str) -> float | None:
    """The last logged value of ``column`` in ``run_dir/metrics.csv``."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    with open(path) as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return values[-1] if values else None


def latest_png(folder: Path) -> Path | None:
    """The newest ``step_*.png`` in ``folder`` (the names sort by step)."""
    pictures = sorted(folder.glob("step_*.png"))
    return pictures[-1] if pictures else None


def summary_table(output_dir: Path, run_name: str, tasks: list[str]) -> tuple[str, bool]:
    """Markdown table of each task's final metric beside its trivial baseline; True if all beat it. Depth
    gets a second row: the image-independent mean depth map (``experiments.baselines``), a harder yardstick
    than the issue's constant depth, shown but not part of the verdict."""
    rows = [
        "| task | metric | model | trivial baseline | baseline predicts | beats it |",
        "|---|---|---|---|---|---|",
    ]
    all_better = True
    for task in tasks:
        column, label, higher = MAIN_METRICS[task]
        run_dir = output_dir / task / run_name
        value = last_value(run_dir, column)
        shown = "missing" if value is None else f"{value:.4f}"
        # The first yardstick is the verdict; depth's mean depth map after it is shown only (README).
        for i, (what, base_value) in enumerate(yardsticks(task, run_dir, max_batches=BASELINE_FIT_BATCHES)):
            better = value is not None and (value > base_value if higher else value < base_value)
            if i == 0:
                all_better &= better
            verdict = "yes" if better else "NO" if i == 0 else "no"
            rows.append(f"| {task} | {label} | {shown} | {base_value:.4f} | {what} | {verdict} |")
    return "\n".join(rows), all_better


def collect_pictures(output_dir: Path, run_name: str, tasks: list[str], dest: Path) -> list[Path]:
    """Copy the last MAE reconstruction and each task's last prediction picture to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = {"demo_mae_reconstructions.png": output_dir / "pretrain" / run_name / "reconstructions"}
    sources.update({f"demo_{t}_predictions.png": output_dir / t / run_name / "predictions" for t in tasks})
    copied = []
    for name, folder in sources.items():
        picture = latest_png(folder)
        if picture is not None:
            copied.append(Path(shutil.copyfile(picture, dest / name)))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="datasets", help="where SynthHumans is generated")
    parser.add_argument("--output-dir", default="runs", help="where runs are written")
    parser.add_argument("--run-name", default="demo")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=120)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: each preset's")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tunes run side by side")
    parser.add_argument("--tasks", nargs="+", default=list(MAIN_METRICS), choices=list(MAIN_METRICS))
    parser.add_argument("--style", default="simple", choices=sorted(SCENE_STYLES), help="scene difficulty")
    parser.add_argument("--max-people", type=int, default=1, help="people per image: 1..N")
    parser.add_argument("--pictures", type=Path, default=None, help="also copy the final pictures here")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16-mixed where the CPU has native bf16 matmuls, else 32-true",
    )
    args = parser.parse_args(argv)
    precision = resolve_precision(args.precision)

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    data_root = Path(args.data_dir) / f"synthhumans_{args.style}_{args.max_people}p"
    if not build_data(args, data_root):
        return 1
    common = [
        f"paths.data_dir={args.data_dir}",
        f"data.root={data_root}",
        f"paths.output_dir={args.output_dir}",
        f"run_name={args.run_name}",
        "trainer.enable_progress_bar=false",
        f"trainer.precision={precision}",
    ]
    logs = output_dir / "logs"
    steps = [] if args.pretrain_steps is None else [f"trainer.max_steps={args.pretrain_steps}"]
    # Data in the training process, every core on the model: decoding the MAE batches is cheap, and with
    # two data workers the model got one thread of two cores (129 s against about 75 s for 300 steps).
    pretrain = Job(
        "pretrain",
        ["experiment=pretrain_demo", *common, *steps, *thread_args(1)],
        logs / f"pretrain_{args.run_name}.log",
        output_dir / "pretrain" / args.run_name,
    )
    if not run_jobs([pretrain], parallel=1)[0].ok:
        return 1
    pretrained = output_dir / "pretrain" / args.run_name / "checkpoints" / "last.ckpt"
    steps = [] if args.finetune_steps is None else [f"trainer.max_steps={args.finetune_steps}"]
    if args.jobs > 1:  # side by side: one thread each, data prepared in the training process
        steps += thread_args(args.jobs)
    finetunes = [
        Job(
            task,
            [f"experiment={task}_demo", *common, *steps, f"task.init_from={pretrained}"],
            logs / f"{task}_{args.run_name}.log",
            output_dir / task / args.run_name,
        )
        for task in sorted(args.tasks, key=LAUNCH_ORDER.index)
    ]
    run_jobs(finetunes, parallel=args.jobs, stop_on_failure=False)
    failed = [j.name for j in finetunes if not j.ok]

    done = [t for t in args.tasks if t not in failed]
    table, all_better = summary_table(output_dir, args.run_name, done)
    pre_loss = last_value(output_dir / "pretrain" / args.run_name, "val/loss")
    minutes = (time.perf_counter() - start) / 60
    cpu = (pretrain.cpu_s + sum(j.cpu_s for j in finetunes)) / 60
    summary = output_dir / f"{args.run_name}_summary.md"
    summary.write_text(
        f"MAE pretraining val/loss: {pre_loss}\n\n{table}\n\n{minutes:.1f} min wall, "
        f"{cpu:.1f} CPU-minutes of training, precision {precision}\n"
    )
    print(f"\nMAE pretraining: final val/loss {pre_loss:.4f}")
    print(table)
    dest = args.pictures or output_dir / "demo_pictures"
    pictures = collect_pictures(output_dir, args.run_name, done, dest)
    print("\nPictures (MAE original | masked | reconstruction; per task ground truth | prediction):")
    print("\n".join(f"  {p}" for p in pictures))
    print(f"\nDemo finished in {minutes:.1f} min ({cpu:.1f} CPU-minutes of training); summary in {summary}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see {logs})")
        return 1
    return 0 if all_better else 2


if __name__ == "__main__":
    sys.exit(main())
