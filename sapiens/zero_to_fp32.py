"""Turn a DeepSpeed ZeRO checkpoint directory into one fp32 file for fine-tuning and inference.

Training under ZeRO stage 2 or 3 (Lightning ``DeepSpeedStrategy``) saves a *directory*: every rank
writes its shard of the fp32 master weights and optimizer moments. That directory is what a run
resumes from (keep it). Everything downstream (fine-tuning from a pretrained backbone, evaluation,
export) wants a single file instead; :func:`convert_zero_checkpoint` writes it.

Accepted layouts (``DIR`` is what you pass)::

    DIR/latest                    text file naming the tag directory
    DIR/<tag>/mp_rank_00_model_states.pt                 (stage 1/2)
    DIR/<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt  (stage 3)
    DIR/<tag>/*_optim_states.pt   one per rank

``<tag>`` is ``checkpoint`` for Lightning (``epoch=0-step=100.ckpt/checkpoint/``) and
``global_stepN`` for plain DeepSpeed. ``DIR`` may also be the tag directory itself, or a directory
without ``latest`` that holds exactly one tag directory.

Output: a ``torch.save`` dict with ``state_dict`` (parameter and buffer name -> fp32 tensor, the
names of the trained module, e.g. the LightningModule's ``model.backbone.blocks.0.attn.qkv.weight``)
plus Lightning's own entries when present (``epoch``, ``global_step``, ``hyper_parameters``,
``pytorch-lightning_version``, ...) so ``LightningModule.load_from_checkpoint`` works, and
``zero_conversion`` (source directory, tag, ZeRO stage). Optimizer state is *not* kept: the file
cannot resume a run (``fit(ckpt_path=...)``); resume from the directory.

Safety: a checkpoint file is a pickle, and unpickling can run arbitrary code. Every file of the tag
directory is first loaded with ``weights_only=True``, allowing only tensors, plain containers and the
few DeepSpeed classes its checkpoints hold (:data:`DEEPSPEED_GLOBALS`); a file holding anything else is
refused, unless ``--trust-checkpoint`` (``trust=True``) says it was written by you or someone you trust.
Only then does DeepSpeed's own consolidation (which unpickles without restriction) read the files.

CLI: ``python -m sapiens.zero_to_fp32 DIR OUT [--tag TAG] [--exclude-frozen] [--trust-checkpoint]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import torch

from sapiens.checkpoints import load_checkpoint_file

MODEL_STATE_FILES = {
    # ZeRO stage -> name of the (rank 0) file holding the module's buffers and the client state
    2: "mp_rank_00_model_states.pt",
    3: "zero_pp_rank_0_mp_rank_00_model_states.pt",
}

# Entries DeepSpeed writes into the model-state file for its own bookkeeping. They are dropped:
# the rest is the "client state" (Lightning's epoch, loops, hyper_parameters, ...).
_DEEPSPEED_KEYS = frozenset(
    {
        "module",
        "optimizer",
        "lr_scheduler",
        "buffer_names",
        "param_shapes",
        "frozen_param_shapes",
        "frozen_param_fragments",
        "shared_params",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "csr_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
        "ds_version",
    }
)

# The classes DeepSpeed pickles into ZeRO checkpoints (besides tensors and plain containers): ZeRO
# optimizer states hold the stage as an enum, the loss scaler object and fragment addresses of the flat
# partitions (DeepSpeed 0.10 - 0.19). Their unpickling sets plain attributes; no code of theirs runs.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

# Lightning < 2.1 wrapped the LightningModule; its checkpoints carry this prefix on every key.
_LEGACY_WRAPPER_PREFIX = "_forward_module."


def _is_tag_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_STATE_FILES.values())


def resolve_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """Find the ZeRO checkpoint root and tag inside ``checkpoint_dir``.

    Args:
        checkpoint_dir: a ZeRO checkpoint directory in one of the layouts of the module docstring.
        tag: name of the tag sub-directory; ``None`` reads ``latest`` or finds the only one.

    Returns:
        ``(root, tag)`` with ``root / tag`` holding the ``*_model_states.pt`` file.

    Raises:
        FileNotFoundError: the directory or the tag directory does not exist.
        ValueError: the directory is not a ZeRO checkpoint, or the tag is ambiguous.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        kind = "a file" if root.exists() else "missing"
        raise FileNotFoundError(
            f"ZeRO checkpoint '{root}' is {kind}; expected the directory DeepSpeed/Lightning "
            "saved (a 'latest' file and a tag directory such as 'checkpoint/' or "
            "'global_step100/')."
        )
    if tag is None and _is_tag_dir(root) and not (root / "latest").is_file():
        return root.parent, root.name
    if tag is None:
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
        else:
            candidates = sorted(p.name for p in root.iterdir() if p.is_dir() and _is_tag_dir(p))
            if len(candidates) != 1:
                found = ", ".join(candidates) if candidates else "none"
                raise ValueError(
                    f"'{root}' has no 'latest' file and {len(candidates)} tag directories "
                    f"({found}); pass tag=... (CLI: --tag) to choose one. Expected files: "
                    f"{' or '.join(MODEL_STATE_FILES.values())}."
                )
            tag = candidates[0]
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"ZeRO checkpoint tag directory '{tag_dir}' does not exist.")
    if not _is_tag_dir(tag_dir):
        raise ValueError(
            f"'{tag_dir}' holds no DeepSpeed model-state file "
            f"({' or '.join(MODEL_STATE_FILES.values())}); is it a ZeRO checkpoint?"
        )
    return root, tag


def deepspeed_safe_globals() -> list:
    """The classes of :data:`DEEPSPEED_GLOBALS` this DeepSpeed has (for ``safe_globals``)."""
    classes = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: a file that needs it is refused, with its name
    return classes


def load_restricted(path: Path, trust: bool = False) -> Any:
    """``torch.load`` of a DeepSpeed file with ``weights_only=True`` and :data:`DEEPSPEED_GLOBALS`
    allowed (tensors memory-mapped, so only the small entries are read); ``trust`` lifts the restriction.

    Raises:
        ValueError: the file holds other objects (named), or is not a PyTorch file.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return load_checkpoint_file(path, mmap=True)
        except ValueError as err:
            raise ValueError(
                f"{err}. Convert it only if you wrote it or trust its source: pass --trust-checkpoint "
                "(trust=True) to load it without this restriction"
            ) from None


def check_tag_dir(tag_dir: Path, trust: bool = False) -> None:
    """Load every ``*.pt`` file of ``tag_dir`` under :func:`load_restricted` before DeepSpeed (which
    unpickles them without restriction) reads them."""
    if trust:
        return
    for path in sorted(tag_dir.glob("*.pt")):
        load_restricted(path)


def _read_client_state(tag_dir: Path, trust: bool = False) -> tuple[dict[str, Any], int]:
    """Return (client state without DeepSpeed internals, ZeRO stage) from the rank-0 model file."""
    for stage, name in sorted(MODEL_STATE_FILES.items(), reverse=True):
        path = tag_dir / name
        if path.is_file():
            state = load_restricted(path, trust)
            zero_cfg = (state.get("ds_config") or {}).get("zero_optimization") or {}
            stage = int(zero_cfg.get("stage", stage))
            client = {k: v for k, v in state.items() if k not in _DEEPSPEED_KEYS}
            return client, stage
    raise ValueError(f"no model-state file in '{tag_dir}'")


def convert_zero_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    trust: bool = False,
) -> Path:
    """Consolidate a ZeRO stage 1/2/3 checkpoint directory into one fp32 file, written atomically.

    Args:
        checkpoint_dir: the saved directory (see module docstring for the accepted layouts).
        output_file: destination ``.ckpt``/``.pt`` path; parent directories are created. It is
            written to a temporary file next to it and renamed, so a crash never leaves a
            half-written file under this name.
        tag: tag sub-directory; ``None`` reads ``latest``.
        exclude_frozen_parameters: leave out parameters with ``requires_grad=False`` (only valid
            when training saved them with ``exclude_frozen_parameters`` too).
        trust: load the files without the ``weights_only`` restriction (see the module docstring);
            only for checkpoints you wrote or whose source you trust.

    Returns:
        The output path. The file holds ``state_dict`` (str -> float32 tensor, every parameter
        and persistent buffer with its training shape), Lightning's client state, and
        ``zero_conversion`` = {"checkpoint_dir", "tag", "zero_stage"}.

    Raises:
        FileNotFoundError / ValueError: not a ZeRO checkpoint directory, or a file holds objects
            other than tensors, plain containers and :data:`DEEPSPEED_GLOBALS` (message says why).
        ModuleNotFoundError: DeepSpeed is not installed.
    """
    root, tag = resolve_checkpoint(checkpoint_dir, tag)
    output = Path(output_file)
    if output.is_dir():
        raise ValueError(f"output '{output}' is a directory; give a file path such as model.ckpt.")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:  # pragma: no cover - deepspeed is a project dependency
        raise ModuleNotFoundError(
            "converting ZeRO checkpoints needs DeepSpeed: pip install deepspeed"
        ) from err

    check_tag_dir(root / tag, trust)
    client, stage = _read_client_state(root / tag, trust)
    # DeepSpeed stitches the per-rank flat fp32 partitions back into named tensors.
    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(root), tag=tag, exclude_frozen_parameters=exclude_frozen_parameters
    )
    state_dict = {
        key.removeprefix(_LEGACY_WRAPPER_PREFIX): tensor.float().contiguous()
        for key, tensor in weights.items()
    }
    checkpoint = {
        **client,
        "state_dict": state_dict,
        "zero_conversion": {"checkpoint_dir": str(root.resolve()), "tag": tag, "zero_stage": stage},
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sapiens.zero_to_fp32",
        description="Consolidate a DeepSpeed ZeRO checkpoint directory into one fp32 file.",
    )
    parser.add_argument("checkpoint_dir", help="directory saved by DeepSpeed / Lightning")
    parser.add_argument("output_file", help="file to write, e.g. pretrain_fp32.ckpt")
    parser.add_argument("--tag", default=None, help="tag sub-directory (default: read 'latest')")
    parser.add_argument(
        "--exclude-frozen",
        action="store_true",
        help="leave out frozen (requires_grad=False) params",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load files holding Python objects other than tensors, plain containers and DeepSpeed's "
        "own state classes (unpickling such objects can run arbitrary code: only for checkpoints you "
        "wrote or whose source you trust)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_zero_checkpoint(
            args.checkpoint_dir, args.output_file, args.tag, args.exclude_frozen, args.trust_checkpoint
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    state = load_restricted(out, trust=args.trust_checkpoint)
    n_params = sum(t.numel() for t in state["state_dict"].values())
    info = state["zero_conversion"]
    print(
        f"wrote {out}: {len(state['state_dict'])} tensors, {n_params:,} values (fp32), "
        f"from ZeRO stage {info['zero_stage']} tag '{info['tag']}'"
    )


if __name__ == "__main__":
    main()
