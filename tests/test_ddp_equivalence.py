"""2-process DDP (gloo) ends with the same weights as 1 process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def train(devices: int, batch: int, out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/ddp_equivalence.py"), str(devices), str(batch), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def test_two_processes_match_one_process(tmp_path):
    single = train(1, 8, tmp_path / "one.pt")
    double = train(2, 4, tmp_path / "two.pt")
    compared = 0
    for key, value in single.items():
        if ".conv_layers." in key and key.endswith(".bias"):
            # A conv bias right before InstanceNorm has an exactly-zero true gradient; AdamW turns the
            # rounding noise left in it into lr-sized steps, which differ with the reduction order.
            continue
        assert torch.allclose(value, double[key], atol=2e-5, rtol=1e-4), key
        compared += 1
    assert compared > 20
