"""Run ``python train.py ...`` jobs, several at a time, each with its own log; used by the demo and the study.

A 2-core machine trains two single-threaded runs side by side faster than one run on two threads
(small matrices scale badly across threads, and threads that wait on each other stall when other
programs share the cores), so the demo and the study fine-tune in pairs. Each job prints its command
when it starts and one line when it ends, with its wall time and its CPU time (user + sys, data
workers included); while jobs run, a status line every ``status_every`` seconds gives each job's last
logged step.
"""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One ``train.py`` run: ``args`` are its Hydra overrides; output goes to ``log``."""

    name: str
    args: list[str]
    log: Path
    run_dir: Path | None = None  # where metrics.csv appears (for the status line)
    max_steps: int | None = None
    ok: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    started: float = field(default=0.0, repr=False)


def thread_args(side_by_side: int) -> list[str]:
    """train.py overrides for a run that shares the cores with ``side_by_side - 1`` others: the data decoded
    in the training process (data workers would take cores from the model: with two of them
    ``cpu_threads=auto`` leaves the model one thread of two cores), and one thread each when runs share."""
    return ["data.num_workers=0", *(["cpu_threads=1"] if side_by_side > 1 else [])]


PRECISIONS = ("auto", "32-true", "bf16-mixed")


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). There bf16 autocast makes
    a demo step 17-25% faster; elsewhere bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(choice: str) -> str:
    """``trainer.precision`` for ``choice`` (one of :data:`PRECISIONS`): ``auto`` is bf16-mixed where the
    CPU has native bf16 matmuls, else 32-true (printed)."""
    if choice != "auto":
        return choice
    precision = "bf16-mixed" if native_cpu_bf16() else "32-true"
    print(f"precision: {precision} (auto: native bf16 matmuls: {precision != '32-true'})")
    return precision


def _last_step(run_dir: Path | None) -> int | None:
    """Largest ``step`` logged so far in ``run_dir/metrics.csv`` (None before the first flush)."""
    if run_dir is None or not (run_dir / "metrics.csv").exists():
        return None
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    except (OSError, ValueError, KeyError):
        return None  # being written
    return max(steps) if steps else None


def _status(running: dict[int, Job]) -> str:
    parts = []
    for job in running.values():
        step = _last_step(job.run_dir)
        total = f"/{job.max_steps}" if job.max_steps else ""
        shown = "starting" if step is None else f"step {step}{total}"
        parts.append(f"{job.name} {shown} ({time.perf_counter() - job.started:.0f} s)")
    return "  ... " + " | ".join(parts)


def run_jobs(
    jobs: list[Job],
    parallel: int = 2,
    env: dict[str, str] | None = None,
    status_every: float = 60.0,
    stop_on_failure: bool = True,
) -> list[Job]:
    """Run ``jobs`` (at most ``parallel`` at once, in order); fills ``ok``, ``wall_s`` and ``cpu_s``.

    With ``stop_on_failure``, a failed job stops the launching of further jobs (running ones finish).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    pending = list(jobs)
    running: dict[int, Job] = {}
    procs: dict[int, subprocess.Popen] = {}
    failed = False
    last_status = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel and not (failed and stop_on_failure):
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "train.py", *job.args]
            print(f"$ {shlex.join(cmd[1:])}  > {job.log}", flush=True)
            with open(job.log, "w") as log:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            job.started = time.perf_counter()
            running[proc.pid] = job
            procs[proc.pid] = proc
        if failed and stop_on_failure:
            pending.clear()
        if not running:
            break
        done = None
        for pid in list(running):
            reaped, status, usage = os.wait4(pid, os.WNOHANG)
            if reaped == pid:
                done = (pid, status, usage)
                break
        if done is None:
            time.sleep(0.5)
            if time.perf_counter() - last_status > status_every:
                print(_status(running), flush=True)
                last_status = time.perf_counter()
            continue
        pid, status, usage = done
        job = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        procs.pop(pid).returncode = code
        job.wall_s = time.perf_counter() - job.started
        job.cpu_s = usage.ru_utime + usage.ru_stime  # the job and the children it waited for
        job.ok = code == 0
        failed |= not job.ok
        verdict = "ok" if job.ok else f"FAILED (exit {code}; see {job.log})"
        print(f"  {job.name}: {verdict} in {job.wall_s:.0f} s wall, {job.cpu_s:.0f} s CPU", flush=True)
    return jobs
