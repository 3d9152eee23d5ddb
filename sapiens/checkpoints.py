"""Checkpoint formats: published Sapiens (mmengine) keys <-> ours, and safe loading for initialisation.

Published layouts (reference section 5):
- pretraining ``sapiens_*_clean.pth``: a flat dict of encoder keys (``cls_token``, ``pos_embed`` (1, 4097, C),
  ``patch_embed.projection.*``, ``layers.i.{ln1,attn.qkv,attn.proj,ln2,ffn.layers.0.0,ffn.layers.1}.*``,
  ``ln1.*``);
- fine-tuned: ``{"state_dict": {"backbone.<keys above>", "head.*" | "decode_head.*"}, "meta": ...}``.

Ours use timm names (``patch_embed.proj``, ``blocks.i.norm1``, ``mlp.fc1``, ``norm``...). Accepted inputs of
:func:`load_backbone_state`: a published file, a Lightning checkpoint of this project (pretraining or
fine-tuning), or a consolidated fp32 state dict from a DeepSpeed ZeRO folder (``sapiens.zero_to_fp32``).
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Backbone key pieces: (published mmpretrain name, ours); "{i}" stands for the block index.
KEY_PIECES = [
    ("patch_embed.projection.", "patch_embed.proj."),
    ("layers.{i}.ln1.", "blocks.{i}.norm1."),
    ("layers.{i}.ln2.", "blocks.{i}.norm2."),
    ("layers.{i}.attn.", "blocks.{i}.attn."),
    ("layers.{i}.ffn.layers.0.0.", "blocks.{i}.mlp.fc1."),
    ("layers.{i}.ffn.layers.1.", "blocks.{i}.mlp.fc2."),
    ("ln1.", "norm."),
]


def _rule(src: str, dst: str) -> tuple[str, str]:
    """A ``(pattern, replacement)`` regex pair mapping key prefix ``src`` to ``dst``."""
    return "^" + re.escape(src).replace(r"\{i\}", r"(\d+)"), dst.replace("{i}", r"\1")


PUBLISHED_TO_OURS = [_rule(published, ours) for published, ours in KEY_PIECES]
OURS_TO_PUBLISHED = [_rule(ours, published) for published, ours in KEY_PIECES]
# Prefixes under which a backbone sits in the checkpoints we accept, most specific first.
BACKBONE_PREFIXES = ("model.encoder.", "backbone.", "encoder.", "module.backbone.")


def rename_keys(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(pattern, replacement)`` rule to each key; others are unchanged."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def is_published_layout(state: dict[str, torch.Tensor]) -> bool:
    """True when keys use the mmpretrain names (``layers.i.ln1`` ...)."""
    return any(k.startswith(("layers.", "patch_embed.projection.")) for k in state)


def describe_load_failure(path: str | Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words a user can act on (torch's own
    messages say ``KeyError: 101`` for a text file, or advise ``weights_only=False``, which must not
    be done with a file one did not write: unpickling can run arbitrary code)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as os_err:
        return f"cannot be read ({os_err.strerror or os_err})"
    if size == 0:
        return "the file is empty (0 bytes)"
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
    """The whole object of a checkpoint file, ``torch.load(path, weights_only=True)`` on the CPU, or a
    one-line error naming it and saying why it cannot be loaded (missing, a folder (DeepSpeed ZeRO), a
    text file, a pickle of other objects, truncated bytes). ``mmap``: map the tensors instead of reading
    them (for a zip checkpoint: cheap even for a multi-GB file, when only its small entries such as
    ``global_step`` are needed)."""
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
        with warnings.catch_warnings():  # "Detected pickle protocol 4": harmless for torch.save files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle errors, truncated files, text files
        raise ValueError(f"cannot read checkpoint {path}: {describe_load_failure(path, err)}") from None


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint file with ``weights_only=True`` and return its flat tensor dict.

    Lightning checkpoints and mmengine files keep tensors under ``state_dict``; ``_clean`` files are flat.
    ``mmap``: map the tensors instead of reading them (a cheap check that the file is usable).
    """
    obj = load_checkpoint_file(path, mmap=mmap)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def extract_backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors of any accepted checkpoint, with our key names and no prefix."""
    for prefix in BACKBONE_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            state = sub
            break
    if is_published_layout(state):
        state = rename_keys(state, PUBLISHED_TO_OURS)
    return state


def load_backbone_state(backbone: nn.Module, path: str | Path, strict: bool = False) -> dict:
    """Initialise ``backbone`` from a checkpoint file; returns ``{"missing": [...], "unexpected": [...]}``.

    The position embedding is adapted by the backbone itself (cls row stripped, grid resized bicubically).
    Missing and unexpected keys are logged by name; ``strict`` turns missing keys into an error.
    """
    state = extract_backbone_state(read_checkpoint(path))
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and k != "pos_embed" and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{path}: {len(mismatched)} tensors do not fit the backbone, e.g. '{k}' has shape "
            f"{tuple(state[k].shape)} but the model expects {tuple(own[k].shape)} "
            "(wrong model size in the config?)"
        )
    result = backbone.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    loaded = len(state) - len(report["unexpected"])
    log.info("loaded %d backbone tensors from %s", loaded, path)
    if report["missing"]:
        log.warning("missing keys (left at their init): %s", ", ".join(report["missing"]))
    if report["unexpected"]:
        log.info("unused keys: %s", ", ".join(report["unexpected"]))
    if strict and report["missing"]:
        raise ValueError(f"{path}: missing backbone keys {report['missing']}")
    if loaded == 0:
        raise ValueError(f"{path}: no backbone tensor matched; is this a Sapiens / sapiens-train checkpoint?")
    return report


# Prefixes of task heads in published fine-tuned checkpoints (pose: head., seg/depth/normal: decode_head.)
# and in ours (task.head.).
HEAD_PREFIXES = ("task.head.", "decode_head.", "head.")


def load_head_state(head: nn.Module, path: str | Path) -> list[str]:
    """Load a task head from a fine-tuned checkpoint (published or ours) when it has one that fits.

    Returns the names of the loaded tensors; an empty list when the file holds no head of this shape
    (e.g. a pretraining checkpoint, or another number of keypoints), which is logged, not an error.
    """
    state = read_checkpoint(path)
    for prefix in HEAD_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            break
    own = head.state_dict()
    if not sub or set(sub) != set(own) or any(sub[k].shape != own[k].shape for k in own):
        if sub:
            log.info("%s has a head that does not fit this task's head; the head starts from scratch", path)
        return []
    head.load_state_dict(sub)
    log.info("loaded the task head (%d tensors) from %s", len(sub), path)
    return sorted(sub)
