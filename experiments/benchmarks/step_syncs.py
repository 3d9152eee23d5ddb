"""Which training steps make the host wait for the device, and where? A sync detector that works on CPU.

    python -m experiments.benchmarks.step_syncs [--steps 12] [--log-every 5] [--trainer cpu] [extra overrides]

Runs a tiny pretraining job through ``sapiens.run`` (the real Lightning trainer, this project's module,
callbacks and data) with a ``TorchFunctionMode`` that records every call which, on a CUDA tensor,
blocks the host until the device catches up: ``item``, ``tolist``, ``bool()`` / ``float()`` /
``int()`` / formatting of a tensor, ``.cpu()`` / ``.numpy()``, ``nonzero``, and ``torch.tensor(...,
device=...)`` (a copy from pageable host memory, which PyTorch completes with a stream sync). On a CPU
run nothing actually waits, but the same calls run, so the report shows what a GPU run would pay.
Each call is attributed to the training step it ran in and to the first stack frame outside torch.

Known host-side reads are not counted (``HOST_SIDE``). What a CPU run cannot show, a CUDA run adds
with ``--cuda-sync-debug trainer=gpu`` (``torch.cuda.set_sync_debug_mode``; ``gpu_checks`` runs it):
syncs that only CUDA makes (blocking copies, NCCL barriers, allocator or kernel-launch logic).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings
import weakref
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[2]
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "cpu", "numpy"}
SYNCING |= {"nonzero", "__array__"}
# Reads of host memory by design (no device work to wait for on CUDA).
HOST_SIDE = {
    "sapiens/lit/step_flags.py": "pinned host copy of the previous step's flags (event waited a step later)",
}


def _where(depth: int = 7) -> str:
    """The first ``depth`` stack frames outside torch and this file, innermost first:
    ``path:line (function) < caller < ...``."""
    frames = []
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" in path or path.endswith("step_syncs.py"):
            continue
        for marker in ("site-packages/", str(REPO).replace(os.sep, "/") + "/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        frames.append(f"{path}:{frame.lineno} ({frame.name})")
        if len(frames) == depth:
            break
    return " < ".join(frames) or "?"


class SyncRecorder(TorchFunctionMode):
    """Records host-syncing tensor calls as (phase, step, call, where).

    To tell what would live on the GPU in a GPU run, it tracks where each tensor made while it is
    active would be: on the host if made by ``.cpu()`` / ``.numpy()``, by a factory without a
    ``device`` (``torch.tensor(3.0)``), or by an op whose tensor inputs are all on the host; on the
    device otherwise (``.to(device)``, ``device=`` anything but the literal ``"cpu"``, anything
    touching a device tensor, and every tensor that existed before, such as parameters and batches).
    Only calls on device tensors are recorded.
    """

    def __init__(self):
        super().__init__()
        self.phase, self.step = "setup", -1
        self.calls: list[tuple[str, int, str, str]] = []
        self._host: set[int] = set()  # ids of live host tensors (tensors compare elementwise: no WeakSet)

    def _mark_host(self, t: torch.Tensor) -> None:
        if id(t) not in self._host:
            self._host.add(id(t))
            weakref.finalize(t, self._host.discard, id(t))

    def _on_host(self, func_name: str, tensors: list[torch.Tensor], kwargs: dict) -> bool:
        if func_name in ("cpu", "numpy"):
            return True
        if func_name in ("to", "cuda", "copy_"):  # .to(device) is "to the accelerator" in a CPU run
            return False
        if not tensors:  # a factory: on the host without a device, or with the literal "cpu"
            return kwargs.get("device") in (None, "cpu")
        return all(id(t) in self._host for t in tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_arg = bool(args) and isinstance(args[0], torch.Tensor) and id(args[0]) not in self._host
        copy_to_device = name == "tensor" and kwargs.get("device") not in (None, "cpu")
        if (name in SYNCING and device_arg) or copy_to_device:
            where = _where()
            if not any(where.startswith(path) for path in HOST_SIDE):
                self.calls.append((self.phase, self.step, name, where))
        out = func(*args, **kwargs)
        if self._on_host(name, tensors, kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
        return out


class SyncPhases(L.Callback):
    """Tells the recorder which training step (or other phase) is running. With ``cuda_sync_debug``
    (a CUDA run), also records what ``torch.cuda.set_sync_debug_mode`` reports: every operation that
    really synchronised, attributed to the Python line that caused it."""

    def __init__(self, recorder: SyncRecorder, cuda_sync_debug: bool = False):
        self.recorder = recorder
        self.cuda_sync_debug = cuda_sync_debug
        self._showwarning = warnings.showwarning

    def _record_cuda_sync(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            where = f"{filename.split('site-packages/')[-1]}:{lineno}"
            self.recorder.calls.append((self.recorder.phase, self.recorder.step, "CUDA sync", where))
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    def on_train_start(self, trainer, pl_module):
        self.recorder.__enter__()  # parameters, optimizer states and batches count as device tensors
        if self.cuda_sync_debug and torch.cuda.is_available():
            warnings.simplefilter("always")
            warnings.showwarning = self._record_cuda_sync
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.recorder.phase, self.recorder.step = "train", trainer.global_step

    def on_validation_start(self, trainer, pl_module):
        self.recorder.phase = "validation"

    def on_validation_end(self, trainer, pl_module):
        self.recorder.phase = "train"

    def on_train_end(self, trainer, pl_module):
        self.recorder.phase = "end"
        self.recorder.__exit__(None, None, None)
        if self.cuda_sync_debug and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.recorder.calls.append(("checkpoint", trainer.global_step, "(checkpoint saved)", ""))


def record_training(
    overrides: list[str], work_dir: Path, cuda_sync_debug: bool = False
) -> tuple[SyncRecorder, int]:
    """Run train.py's config with ``overrides`` under the recorder; returns it and log_every_n_steps."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sapiens import run as run_module

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = [f"paths.output_dir={work_dir}", f"paths.run_dir={work_dir / 'run'}", *overrides]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # as in a train.py run, the job config without Hydra's own section
        del cfg["hydra"]
    recorder = SyncRecorder()
    build = run_module.build_callbacks
    run_module.build_callbacks = lambda c: [*build(c), SyncPhases(recorder, cuda_sync_debug)]
    try:
        run_module.run(cfg)
    finally:
        run_module.build_callbacks = build
    return recorder, int(cfg.trainer.log_every_n_steps)


def summarize(recorder: SyncRecorder, log_every: int) -> dict[str, list]:
    """Per training step: the syncing calls; split into logging steps and the others."""
    by_step: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for phase, step, name, where in recorder.calls:
        if phase == "train":
            by_step[step].append((name, where))
    logging_steps = {s for s in by_step if (s + 1) % log_every == 0}
    steps = sorted(by_step.items())
    return {
        "other_steps": [(s, c) for s, calls in steps if s not in logging_steps for c in calls],
        "logging_steps": [(s, c) for s, calls in steps if s in logging_steps for c in calls],
    }


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--data-root", default=None, help="a data root with shards/pretrain (default: made)")
    parser.add_argument("--work-dir", default=None, help="where the run goes (default: a new temp dir)")
    parser.add_argument(
        "--cuda-sync-debug",
        action="store_true",
        help="on a CUDA run (trainer=gpu), also record torch.cuda.set_sync_debug_mode's real syncs",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. compile=true)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="step_syncs_"))
    root = Path(args.data_root) if args.data_root else work / "data"
    if not args.data_root:
        from tests.conftest import write_image_shards

        write_image_shards(root / "shards" / "pretrain" / "train", 64, 16, seed=0)
        write_image_shards(root / "shards" / "pretrain" / "val", 16, 16, seed=1)
    overrides = [
        "experiment=pretrain_demo", "model=vit_tiny", "task.image_size=[64,48]", "task.decoder.dim=32",
        "task.decoder.depth=1", "task.decoder.heads=4", "data.batch_size=4", "data.num_workers=0",
        "data.epoch_length=100", "trainer.limit_val_batches=1", f"trainer.max_steps={args.steps}",
        f"trainer.log_every_n_steps={args.log_every}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "validate_after_fit=false", "run_name=syncs",
        "callbacks.checkpoint.every_n_train_steps=1000", f"data.root={root}", *args.overrides,
    ]  # fmt: skip
    recorder, log_every = record_training(overrides, work, args.cuda_sync_debug)
    report = summarize(recorder, log_every)
    for key, title in (("other_steps", "steps that do not log"), ("logging_steps", "logging steps")):
        counts = Counter((name, where) for _, (name, where) in report[key])
        steps = {s for s, _ in report[key]}
        print(f"\nhost syncs in {title}: {len(report[key])} calls in {len(steps)} steps")
        for (name, where), n in counts.most_common():
            print(f"  {n:4d} x {name:10s} {where}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
