"""`make demo`: SynthHumans -> MAE pretraining -> pose / seg / depth / normal fine-tunes -> metric table.

Every step is an ordinary command you can run yourself (printed before it runs). Re-running is cheap:
the dataset is kept and finished runs resume at their last step.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data.synthhumans.shards import build

ROOT = Path(__file__).resolve().parents[1]
# task -> (metric column, label, higher is better)
MAIN_METRICS = {
    "pose": ("val/AP", "OKS AP", True),
    "seg": ("val/mIoU", "mIoU", True),
    "depth": ("val/rmse", "RMSE (aligned)", False),
    "normal": ("val/mean_angular_error", "mean angle (deg)", False),
}


def train(args: list[str]) -> None:
    """Run ``python train.py *args`` in the foreground; stop the demo if it fails."""
    cmd = [sys.executable, "train.py", *args]
    print(f"\n$ {shlex.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def last_value(run_dir: Path, column: str) -> float | None:
    """The last logged value of ``column`` in ``run_dir/metrics.csv``."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    with open(path) as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="datasets", help="where SynthHumans is generated")
    parser.add_argument("--output-dir", default="runs", help="where runs are written")
    parser.add_argument("--run-name", default="demo")
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--val-images", type=int, default=120)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--tasks", nargs="+", default=list(MAIN_METRICS), choices=list(MAIN_METRICS))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data_root = Path(args.data_dir) / "synthhumans"
    build(data_root, args.train_images, args.val_images)
    common = [
        f"paths.data_dir={args.data_dir}",
        f"paths.output_dir={args.output_dir}",
        f"run_name={args.run_name}",
    ]
    train(["experiment=pretrain_demo", *common, f"trainer.max_steps={args.pretrain_steps}"])
    pretrained = Path(args.output_dir) / "pretrain" / args.run_name / "checkpoints" / "last.ckpt"
    for task in args.tasks:
        train(
            [
                f"experiment={task}_demo",
                *common,
                f"trainer.max_steps={args.finetune_steps}",
                f"task.init_from={pretrained}",
            ]
        )

    rows = ["| task | metric | value | run directory |", "|---|---|---|---|"]
    for task in args.tasks:
        column, label, _ = MAIN_METRICS[task]
        run_dir = Path(args.output_dir) / task / args.run_name
        value = last_value(run_dir, column)
        shown = "missing" if value is None else f"{value:.4f}"
        rows.append(f"| {task} | {label} | {shown} | {run_dir} |")
    pre_loss = last_value(Path(args.output_dir) / "pretrain" / args.run_name, "val/loss")
    table = "\n".join(rows)
    summary = Path(args.output_dir) / f"{args.run_name}_summary.md"
    summary.write_text(f"MAE pretraining val/loss: {pre_loss}\n\n{table}\n")
    print(
        f"\nMAE pretraining: final val/loss {pre_loss:.4f} "
        f"(reconstructions in {Path(args.output_dir) / 'pretrain' / args.run_name / 'reconstructions'})"
    )
    print(table)
    print(f"\nDemo finished in {(time.perf_counter() - start) / 60:.1f} min; summary in {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
