"""Reading and writing checkpoint files: the one ``weights_only`` loader, one-line reasons when a file
cannot be read, and atomic ``.safetensors`` writing.

Accepted files: torch files (``torch.save`` zip or legacy pickle, loaded with ``weights_only=True``, so no
code in a downloaded file can run) and ``.safetensors`` (the published Sapiens2 weights and our exports).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
# Top-level keys under which torch files keep their tensors (Lightning / mmengine, Accelerate, DINO teacher).
WRAPPER_KEYS = ("state_dict", "model", "teacher")
# Which encoder of a self-distillation checkpoint initialises a backbone (sapiens.checkpoints docstring).
WEIGHT_SOURCES = ("teacher", "student")


def describe_load_failure(path: str | Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` (or the safetensors reader) failed, in words a user can
    act on (torch's own messages say ``KeyError: 101`` for a text file, or advise ``weights_only=False``,
    which must not be done with a file one did not write: unpickling can run arbitrary code)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as os_err:
        return f"cannot be read ({os_err.strerror or os_err})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if path.suffix == SAFETENSORS_SUFFIX:
        return f"a truncated or damaged safetensors file ({str(err).splitlines()[0][:120]})"
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" such as {found.group(1)}" if found else ""
        return (
            f"it holds Python objects{what}, not only tensors; it is refused because unpickling "
            "them could run arbitrary code (only tensors and plain containers are loaded)"
        )
    if head.startswith(b"PK\x03\x04"):
        return f"a truncated or damaged PyTorch checkpoint ({str(err).split('. ')[0][:120]})"
    if head.startswith(b"\x80"):
        return "a Python pickle that is not a torch.save checkpoint"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file, not a PyTorch checkpoint (it starts with {head[:24].decode()!r})"
    return f"not a PyTorch checkpoint ({size} bytes, starting with {head[:8]!r})"


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> Any:
    """The whole object of a checkpoint file on the CPU: ``torch.load(path, weights_only=True)``, or the
    flat tensor dict of a ``.safetensors`` file; else a one-line error naming it and saying why it cannot
    be loaded (missing, a folder (DeepSpeed ZeRO), a text file, a pickle of other objects, truncated bytes).
    ``mmap``: map the tensors instead of reading them (for a zip checkpoint: cheap even for a multi-GB
    file, when only its small entries such as ``global_step`` are needed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder (a DeepSpeed ZeRO checkpoint?): convert it first with "
            f"`python -m sapiens.zero_to_fp32 {path} {path}.fp32.pt`"
        )
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with warnings.catch_warnings():  # "Detected pickle protocol 4": harmless for torch.save files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle / header errors, truncated files, text files
        raise ValueError(f"cannot read checkpoint {path}: {describe_load_failure(path, err)}") from None


def read_checkpoint(
    path: str | Path, mmap: bool = False, *, weights: str = "teacher"
) -> dict[str, torch.Tensor]:
    """Load a checkpoint file (``.safetensors``, or torch with ``weights_only=True``); its flat tensor dict.

    Torch files may keep tensors under ``state_dict`` (Lightning, mmengine), ``model`` or ``teacher``
    (Sapiens2's pretrained-init path); ``_clean`` and safetensors files are flat. A file with a student and
    a ``teacher`` entry gives the teacher for ``weights="teacher"`` and the student for ``"student"``.
    ``mmap``: map the tensors instead of reading them (a cheap check that the file is usable).
    """
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights must be one of {WEIGHT_SOURCES}, got {weights!r}")
    obj = load_checkpoint_file(path, mmap=mmap)
    if isinstance(obj, dict):
        obj = _unwrap(obj, weights, Path(path))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def _unwrap(obj: dict, weights: str, path: Path) -> dict:
    """The tensor dict inside a loaded torch file, for ``weights`` (see :func:`read_checkpoint`)."""
    student = next((k for k in WRAPPER_KEYS[:2] if isinstance(obj.get(k), dict)), None)
    if isinstance(obj.get("teacher"), dict) and (weights == "teacher" or student is None):
        if student is not None:
            log.info(
                "%s: using its EMA teacher's weights (task.init_weights=student for the student's)", path
            )
        elif weights == "student":
            log.warning("%s holds only teacher weights; using them", path)
        return obj["teacher"]
    return obj[student] if student else obj


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``state`` as a ``.safetensors`` file atomically (temporary file + rename); returns the path.

    Tensors are made contiguous and CPU-resident; tensors sharing storage are copied (the format forbids it).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path}: a safetensors file must end in {SAFETENSORS_SUFFIX}")
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path
