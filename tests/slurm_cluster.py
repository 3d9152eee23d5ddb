"""Fixtures and helpers for tests that run real Slurm jobs on a single-node local cluster.

``slurm_cluster`` (session fixture) makes sure a cluster answers: it uses one that is already up,
else runs ``slurm/local_cluster.sh`` (root only: installs slurm-wlm + munge when missing, writes
/etc/slurm/slurm.conf, starts munged/slurmctld/slurmd). When that is impossible the tests are
skipped with the reason (never silently). ``SAPIENS_TEST_SLURM=0`` skips them on purpose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "slurm" / "local_cluster.sh"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Pending reasons that resolve by themselves; any other one (PartitionConfig, ReqNodeNotAvail,
# BadConstraints...) means the job can never start here.
TRANSIENT_PENDING = {"None", "Priority", "Resources", "BeginTime", "Dependency", "JobHeldAdmin"}


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30, check=False
    )
    return proc.returncode == 0 and any(
        s.strip() in ("idle", "mix", "alloc", "comp") for s in proc.stdout.split()
    )


def start_local_cluster() -> None:
    """Bring up the local cluster or ``pytest.skip`` with the reason."""
    if os.environ.get("SAPIENS_TEST_SLURM") == "0":
        pytest.skip("Slurm tests disabled by SAPIENS_TEST_SLURM=0")
    if _cluster_answers():
        return
    if os.geteuid() != 0:
        pytest.skip(
            "no Slurm cluster answers and starting one needs root (run `sudo slurm/local_cluster.sh` first)"
        )
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is unavailable to install slurm-wlm")
    try:
        proc = subprocess.run(
            ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"{START_SCRIPT.name} did not finish within 600 s")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        pytest.skip(f"could not start the local Slurm cluster: {' | '.join(tail)}")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A Slurm cluster that accepts jobs (started on first use), or the test is skipped."""
    start_local_cluster()


def submit(script: Path, overrides: list[str], env: dict[str, str]) -> str:
    """Submit ``script`` through its own submit mode (``slurm/common.sh``); returns the job id.

    The environment is cleaned of any SLURM_* variables (a test run inside a job must still
    *submit*, not run) and gets ``--parsable`` so sbatch prints the bare id.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full = {**clean, "SBATCH_ARGS": "--parsable", **env}
    proc = subprocess.run(
        ["bash", str(script), *overrides],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"submitting {script.name} failed:\n{proc.stdout}\n{proc.stderr}")
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output: {proc.stdout!r}"
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    proc = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    info = {}
    for field in proc.stdout.split():
        key, _, value = field.partition("=")
        info.setdefault(key, value)
    return info


def wait_for(
    job_id: str, until, timeout: float, log: Path | None = None, pull_requeued: bool = True
) -> dict[str, str]:
    """Poll the job until ``until(info)`` is true; returns the last ``job_info``.

    Slurm holds a requeued job for about two minutes (Reason=BeginTime) before it may start
    again; with ``pull_requeued`` the wait moves its start time to now (root may), which changes
    nothing about how the job resumes. Fails (with the job log) on timeout, on a job that can
    never start, or on a final state the caller did not wait for.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if until(info):
            return info
        state, reason = info.get("JobState", "?"), info.get("Reason", "?")
        tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
        if state in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended {state} ({reason}) unexpectedly:\n{tail}")
        if state == "PENDING" and reason not in TRANSIENT_PENDING:
            subprocess.run(["scancel", job_id], check=False)
            raise AssertionError(f"job {job_id} cannot start here: Reason={reason}")
        if state == "PENDING" and reason == "BeginTime" and pull_requeued:
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                capture_output=True,
                check=False,
            )
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)


def is_final(info: dict[str, str]) -> bool:
    return info.get("JobState") in FINAL_STATES
