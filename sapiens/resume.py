"""Which checkpoint a run resumes from, and which checkpoint files a crash leaves that may go.

A run directory holds Lightning's Slurm preemption checkpoints (``hpc_ckpt_N.ckpt``) and
``checkpoints/`` (``last.ckpt``, periodic ``step_N.ckpt``, ``best.ckpt``). A crash can leave any of them
the newest: a kill between writing ``step_N.ckpt`` and ``last.ckpt``, a preemption checkpoint newer
than ``last.ckpt``, a run started outside Slurm in a directory a Slurm job preempted. So whatever starts
the run, ``ckpt_path=auto`` restores the checkpoint with the highest global step that loads
(at equal steps: hpc, then last, then periodic, then others), and refuses to start when there are
checkpoints but none loads. Nothing is deleted that holds training state no other checkpoint holds: an
hpc checkpoint goes only once a checkpoint at least as new was restored or written.

Cost: each candidate is read with ``mmap`` (tensors are mapped, not read), which costs its small
entries only; periodic files are ordered by the step in their name and read only until one loads.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from sapiens.callbacks.atomic_checkpoint_io import TMP_SUFFIX
from sapiens.checkpoints import load_checkpoint_file

log = logging.getLogger(__name__)

HPC_GLOB = "hpc_ckpt_*.ckpt"
# Preference between checkpoints of the same global step: a preemption checkpoint is written last.
KIND_RANK = {"hpc": 0, "last": 1, "periodic": 2, "other": 3}
STEP_IN_NAME = re.compile(r"step[=_](\d+)")
LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")
# What a checkpoint must hold for a run to resume from it (Lightning's keys).
RESUME_KEYS = ("state_dict", "global_step")


class CheckpointError(ValueError):
    """No checkpoint of the run directory can be restored, or the one asked for cannot."""


@dataclass
class ResumeChoice:
    """The checkpoint to restore (``path``, at global ``step``) and the newer ones that do not load."""

    path: Path
    step: int
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def kind_of(path: Path) -> str:
    """``hpc``, ``last``, ``periodic`` (a step in the name) or ``other``."""
    if path.match(HPC_GLOB):
        return "hpc"
    if LAST_NAME.match(path.name):
        return "last"
    return "periodic" if STEP_IN_NAME.search(path.name) else "other"


def checkpoint_step(path: str | Path) -> int:
    """The global step a training checkpoint holds (a file, or a DeepSpeed checkpoint folder).

    Raises:
        ValueError: it does not load with ``weights_only=True`` or lacks the keys of a Lightning
            training checkpoint; the message says why.
    """
    path = Path(path)
    if path.is_dir():
        return _deepspeed_step(path)
    state = load_checkpoint_file(path, mmap=True)
    missing = [k for k in RESUME_KEYS if not (isinstance(state, dict) and k in state)]
    if missing:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a Lightning training checkpoint (no {', '.join(missing)}; has {keys})"
        )
    return int(state["global_step"])


def _deepspeed_step(folder: Path) -> int:
    from sapiens.zero_to_fp32 import MODEL_STATE_FILES, load_restricted

    files = [f for name in MODEL_STATE_FILES.values() for f in folder.glob(f"*/{name}")]
    if not files:
        raise ValueError(f"{folder} is a folder without a DeepSpeed model-state file")
    state = load_restricted(files[0])
    if "global_step" not in state:
        raise ValueError(f"{files[0]} holds no global_step")
    return int(state["global_step"])


def list_checkpoints(run_dir: str | Path, hpc: bool = True) -> list[Path]:
    """hpc checkpoints of ``run_dir`` and the checkpoints in ``run_dir/checkpoints`` (files or
    DeepSpeed folders named ``*.ckpt``; ``.tmp`` files being written are not checkpoints)."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob(HPC_GLOB)) if hpc else []
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        found += sorted(
            p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.endswith(TMP_SUFFIX)
        )
    return found


def find_resume_checkpoint(run_dir: str | Path, hpc: bool = True) -> ResumeChoice | None:
    """The newest checkpoint of ``run_dir`` that loads; None when there is no checkpoint at all.

    Raises:
        CheckpointError: there are checkpoints but none of them loads (each named with the reason).
    """
    candidates = list_checkpoints(run_dir, hpc)
    unreadable: list[tuple[Path, str]] = []
    ranked: list[tuple[int, int, Path, bool]] = []  # (step, kind rank, path, step read from the file)
    for path in candidates:
        named = STEP_IN_NAME.search(path.name)
        if named and kind_of(path) == "periodic":
            ranked.append((int(named.group(1)), KIND_RANK["periodic"], path, False))
            continue
        try:
            ranked.append((checkpoint_step(path), KIND_RANK[kind_of(path)], path, True))
        except ValueError as err:
            unreadable.append((path, str(err)))
    ranked.sort(key=lambda item: (-item[0], item[1]))
    for step, _, path, read in ranked:
        if not read:
            try:
                step = checkpoint_step(path)
            except ValueError as err:
                unreadable.append((path, str(err)))
                continue
        return ResumeChoice(path, step, unreadable)
    if unreadable:
        listed = "; ".join(f"{p.name}: {why}" for p, why in unreadable[:3])
        raise CheckpointError(
            f"{run_dir} holds {len(unreadable)} checkpoint(s) but none can be restored ({listed}). Move "
            "them away to start from scratch here, or choose another run_name"
        )
    return None


def check_ckpt_path(spec: str) -> int:
    """The global step of the checkpoint ``ckpt_path=spec`` names.

    Raises:
        FileNotFoundError: it does not exist. CheckpointError: it cannot be resumed from (why).
    """
    if not Path(spec).exists():
        raise FileNotFoundError(f"ckpt_path={spec} does not exist")
    try:
        return checkpoint_step(spec)
    except ValueError as err:
        raise CheckpointError(f"ckpt_path={spec}: {err}") from None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """What ``fit`` resumes from: ``ckpt_path=auto`` -> the newest checkpoint of the run directory
    that loads (see the module docstring), None when there is none (a fresh start); null -> None; a
    path -> that file, checked to be a training checkpoint; ``last`` / ``best`` / ``hpc`` -> Lightning's.

    Raises:
        CheckpointError: the checkpoint asked for, or every checkpoint of the run directory, cannot be
            restored.
    """
    spec = cfg.get("ckpt_path")
    if spec in (None, "null", "none"):
        return None
    if spec in ("last", "best", "hpc"):
        return spec
    if spec != "auto":
        check_ckpt_path(spec)
        return str(spec)
    choice = find_resume_checkpoint(cfg.paths.run_dir)
    if choice is None:
        return None
    for path, why in choice.unreadable:
        log.warning("not resuming from %s, which cannot be read: %s", path, why)
    log.info("resuming from %s (global step %d, the newest checkpoint that loads)", choice.path, choice.step)
    # Resuming into a directory with checkpoints is the point; Lightning's warning about it is noise.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return str(choice.path)


def drop_hpc_checkpoints(trainer, run_dir: str | Path) -> None:
    """After a finished fit, hpc checkpoints that a newer checkpoint supersedes go (Lightning would
    otherwise restore them in ``validate`` under Slurm); one that is newer than every other, or that
    cannot be read, stays."""
    trainer.strategy.barrier("hpc_cleanup")
    if trainer.is_global_zero and not trainer.interrupted:
        newest = _newest_step(run_dir)
        for path in Path(run_dir).glob(HPC_GLOB):
            held = _step_or_none(path)
            if newest is not None and held is not None and held <= newest:
                path.unlink()
    trainer.strategy.barrier("hpc_cleanup_done")


def drop_hpc_older_than(run_dir: str | Path, step: int, keep: str | Path | None = None) -> list[Path]:
    """Delete the hpc checkpoints of ``run_dir`` older than ``step`` (a newer checkpoint was
    restored); ``keep`` stays whatever its step. Returns the deleted paths."""
    dropped = []
    for path in Path(run_dir).glob(HPC_GLOB):
        held = _step_or_none(path)
        if held is not None and held < step and (keep is None or Path(keep).resolve() != path.resolve()):
            path.unlink()
            dropped.append(path)
    return dropped


def _step_or_none(path: Path) -> int | None:
    try:
        return checkpoint_step(path)
    except ValueError:
        return None


def _newest_step(run_dir: str | Path) -> int | None:
    try:
        choice = find_resume_checkpoint(run_dir, hpc=False)
    except CheckpointError:
        return None
    return None if choice is None else choice.step
