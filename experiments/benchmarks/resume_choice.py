"""What does choosing the checkpoint to resume from cost, next to loading it?

    python -m experiments.benchmarks.resume_choice --gb 2 --cold

Writes a run directory with one Lightning-shaped checkpoint (``checkpoints/last.ckpt``: a state dict of
4 MiB float32 tensors adding up to ``--gb`` GB, ``global_step``, ``loops``), then times
``sapiens.resume.find_resume_checkpoint`` (the file opened with ``mmap``: only its small entries are
read) against a full ``torch.load(weights_only=True)``. ``--cold`` drops the page cache before each
(Linux, root), which is what a rerun after a node failure meets.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.benchmarks._common import markdown_table
from sapiens.resume import find_resume_checkpoint


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache; False when not allowed (not root, not Linux)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB")
    parser.add_argument("--dir", default=None, help="where to write it (default: a temporary folder)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each timing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "checkpoints" / "last.ckpt"
        path.parent.mkdir()
        tensors = max(1, round(args.gb * 1e9 / 2**22))
        state = {f"model.blocks.{i}.weight": torch.randn(1024, 1024) for i in range(tensors)}
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 1, "loops": {}}, path)
        del state
        size_gb = path.stat().st_size / 1e9
        cold = args.cold and drop_page_cache()
        start = time.perf_counter()
        choice = find_resume_checkpoint(tmp)
        choose_s = time.perf_counter() - start
        if args.cold:
            drop_page_cache()
        start = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=True)
        load_s = time.perf_counter() - start
    assert choice is not None and choice.step == 1000
    print(f"checkpoint: {size_gb:.2f} GB, page cache {'dropped' if cold else 'warm'}")
    print(
        markdown_table(
            ["what", "seconds"],
            [["choose (find_resume_checkpoint)", f"{choose_s:.3f}"], ["full torch.load", f"{load_s:.3f}"]],
        )
    )
    print(f"choose / load: {choose_s / load_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
