"""The per-class segmentation report under DDP covers every rank's pixels (2 processes, gloo)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sapiens.tasks.segmentation import SegmentationTask


def _labels(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 sees only classes 0-1, rank 1 only classes 2-3 (logits (1, 28, 4, 4), target (1, 4, 4))."""
    target = torch.full((1, 4, 4), 2 * rank, dtype=torch.long)
    target[:, :, 2:] = 2 * rank + 1
    logits = torch.nn.functional.one_hot(target, 28).permute(0, 3, 1, 2).float()
    logits[0, :, 0, 0] = 0
    logits[0, 27, 0, 0] = 1  # one wrong pixel per rank
    return logits, target


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    task = SegmentationTask(in_channels=8, deconv_channels=(8,), conv_channels=(8,))
    logits, target = _labels(rank)
    task.update_metrics(logits, {"seg": target})
    task.compute_metrics()
    out[rank] = task.report()
    dist.destroy_process_group()


def test_report_sums_confusion_over_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
        reports = dict(out)
    single = SegmentationTask(in_channels=8, deconv_channels=(8,), conv_channels=(8,))
    for rank in (0, 1):
        logits, target = _labels(rank)
        single.update_metrics(logits, {"seg": target})
    single.compute_metrics()
    assert reports[0] == reports[1] == single.report()
    rows = {line.split("|")[1].strip(): line for line in reports[0].splitlines()[2:]}
    assert "n/a" not in rows["2"] and "n/a" not in rows["3"]  # rank 1's classes reached rank 0
