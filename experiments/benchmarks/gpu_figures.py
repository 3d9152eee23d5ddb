"""The GPU table of issue 14: MAE and pose fine-tuning steps, eager and compiled, in bf16.

    python -m experiments.benchmarks.gpu_figures [--models sapiens_0.3b sapiens_1b] [--budget-s 600]

For each model: the MAE step at 1024x1024 and the pose (308 keypoints) fine-tuning step at 1024x768,
with ``compile`` off and on (regional, as ``compile=true`` trains), each in its own process
(``pretrain_throughput --device cuda --dtype bf16``, fused AdamW). Prints images/s, achieved TFLOP/s
(analytic model FLOPs), MFU against the card's dense bf16 peak (``_common.GPU_PEAKS``), peak memory,
compile time, and for every run where its time goes (``--profile``). Batches scale with the card's
memory (the figures below are for 80 GiB); a run that runs out of memory is retried at half the batch.
Runs start in priority order (the 0.3b MAE first: its MFU target is 50 %) until ``--budget-s`` is spent.
Writes ``gpu_figures.md`` (table and profiles) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.benchmarks._common import REPO_ROOT, markdown_table

# (task, height, width, batch on an 80 GiB card) per model
RUNS = {
    "pretrain": (1024, 1024, {"sapiens_0.3b": 16, "sapiens_0.6b": 12, "sapiens_1b": 8, "sapiens_2b": 4}),
    "finetune": (1024, 768, {"sapiens_0.3b": 8, "sapiens_0.6b": 6, "sapiens_1b": 4, "sapiens_2b": 2}),
}


def run_one(task: str, model: str, batch: int, compile_on: bool, args, out: Path) -> dict:
    """One ``pretrain_throughput`` process; its JSON figures plus its printed output."""
    height, width, _ = RUNS[task]
    result = out / f"{task}_{model}_{'compiled' if compile_on else 'eager'}_b{batch}.json"
    cmd = [
        sys.executable, "-m", "experiments.benchmarks.pretrain_throughput", "--device", args.device,
        "--dtype", "bf16", "--task", task, "--model", model, "--height", str(height),
        "--width", str(width), "--batch", str(batch), "--steps", str(args.steps), "--warmup", "2",
        "--keypoints", "308", "--profile", str(args.profile_steps), "--json", str(result),
        "--compile", "regional" if compile_on else "off", "--compile-backend", args.compile_backend,
    ]  # fmt: skip
    if args.smoke:  # the plumbing only: a tiny model on small inputs
        cmd += ["--height", "64", "--width", "48", "--head-channels", "16", "--decoder-dim", "32"]
        cmd += ["--decoder-depth", "1", "--decoder-heads", "4", "--steps", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.run_timeout_s)
    text = proc.stdout + proc.stderr
    if proc.returncode == 0 and result.exists():
        return {**json.loads(result.read_text()), "output": text}
    oom = "OutOfMemoryError" in text or "out of memory" in text
    return {"error": "out of memory" if oom else f"exit {proc.returncode}", "output": text}


def figures(args) -> list[dict]:
    """Every (model, task, compile) run, in priority order, within the time budget."""
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if not args.smoke else 80
    scale = memory_gib / 80 if not args.smoke else 1 / 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(t, m, c) for t in ("pretrain", "finetune") for m in args.models for c in (False, True)]
    start, rows = time.perf_counter(), []
    for task, model, compile_on in plan:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"task": task, "model": model, "compile": compile_on, "error": "skipped (budget)"})
            continue
        batch = max(1, int(RUNS[task][2].get(model, 1) * scale))
        row = run_one(task, model, batch, compile_on, args, out)
        while row.get("error") == "out of memory" and batch > 1:
            batch //= 2
            row = run_one(task, model, batch, compile_on, args, out)
        rows.append({**row, "task": task, "model": model, "compile": compile_on, "batch": batch})
        mfu = 100 * row.get("peak_fraction", 0.0)
        status = row.get("error") or f"{row['images_per_s']:.1f} img/s, MFU {mfu:.1f} %"
        print(f"{task} {model} batch {batch} compile {'on' if compile_on else 'off'}: {status}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    header = ["model", "step", "input", "batch", "compile", "images/s", "TFLOP/s", "MFU %", "peak GiB"]
    header += ["compile s", "vs eager"]
    eager = {(r["task"], r["model"]): r for r in rows if not r["compile"] and "error" not in r}
    lines = []
    for r in rows:
        size = f"{r['height']}x{r['width']}" if "height" in r else "x".join(map(str, RUNS[r["task"]][:2]))
        step = "MAE" if r["task"] == "pretrain" else "pose-308 fine-tune"
        on = "on" if r["compile"] else "off"
        if "error" in r:
            lines.append([r["model"], step, size, r.get("batch", ""), on, r["error"]])
            continue
        base = eager.get((r["task"], r["model"]))
        speedup = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base and r["compile"] else ""
        compile_s = f"{r['compile_warmup_s']:.0f}" if r["compile"] else ""
        tflops, mfu = f"{r['flops_per_s'] / 1e12:.3g}", f"{100 * r['peak_fraction']:.3g}"
        figures = [f"{r['images_per_s']:.1f}", tflops, mfu, f"{r['peak_memory_gib']:.1f}", compile_s, speedup]
        lines.append([r["model"], step, size, r["batch"], on, *figures])
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sapiens_0.3b", "sapiens_1b"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=600, help="no new run starts after this")
    parser.add_argument("--run-timeout-s", type=float, default=420)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "sapiens_gpu_figures"))
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: tests the script, no figures")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        device = f"CPU smoke run, torch {torch.__version__}"
    elif not torch.cuda.is_available():
        print("no CUDA device: GPU figures skipped (run this on a GPU machine)")
        return []
    else:
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"device: {device}", flush=True)
    rows = figures(args)
    report = [f"# GPU figures ({device})", "", table(rows), ""]
    for r in rows:
        if "output" in r:
            profile = r["output"][r["output"].find("profile of") :] if "profile of" in r["output"] else ""
            on = "on" if r["compile"] else "off"
            title = f"{r['model']} {r['task']} compile {on} batch {r.get('batch')}"
            report += [f"## {title}", "", "```", profile.strip() or r["output"][-3000:], "```", ""]
    text = "\n".join(report)
    Path(args.out, "gpu_figures.md").write_text(text)
    print("\n" + table(rows))
    print(f"\nprofiles and the table: {Path(args.out, 'gpu_figures.md')}")
    return rows


if __name__ == "__main__":
    main()
