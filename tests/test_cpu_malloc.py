"""CPU runs keep freed memory: a training step stops re-faulting its activation buffers (glibc)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Ten forward/backward steps of a small seg-like head; prints the minor page faults they cost.
STEPS = """
import resource, sys
import torch
from torch import nn
from sapiens.cpu_malloc import keep_freed_memory

torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
net = nn.Sequential(
    nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.InstanceNorm2d(32), nn.SiLU(),
    nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.InstanceNorm2d(32), nn.SiLU(), nn.Conv2d(32, 28, 1),
)
x = torch.randn(16, 64, 16, 12)
for _ in range(3):  # the first steps: every buffer is new, the heap grows to its working size
    net(x).square().mean().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    net(x).square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_kept_memory_removes_the_page_faults_of_repeated_steps():
    default, kept = page_faults("default"), page_faults("keep")
    # Measured after three warm-up steps: 80-120k faults with glibc's defaults, 1-3k kept (one warm-up step
    # left 3-7k kept against 41-104k: the heap had not reached its working size).
    assert kept * 10 < default, f"{kept} page faults with freed memory kept, {default} with glibc defaults"
