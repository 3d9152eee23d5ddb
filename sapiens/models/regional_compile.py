"""Regional compilation: ``torch.compile`` each repeated block and each task head, in place.

Compiling a ViT block by block instead of the whole model keeps compile time to about one block's
(every block of a stack runs the same code on same-shaped inputs, so they share one compiled graph),
leaves the Python between blocks (masking, position tables, per-block activation checkpointing)
eager, and composes with DDP and DeepSpeed, which see an ordinary module tree.

Modules are compiled with ``nn.Module.compile``, which keeps the module object and its parameters
where they are: ``state_dict`` keys do not change (no ``_orig_mod.`` prefix), so checkpoints written
with and without compilation load into each other, and resuming is unaffected.

What counts as a region (found by walking ``named_modules``):
- every member of an ``nn.ModuleList`` whose members all share one class: a stack of blocks
  (``blocks`` of any backbone family, ``decoder_blocks`` of the MAE decoder);
- every module named ``head`` or ``decode_head`` (task heads), compiled whole.
A module inside a region is not compiled again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_NAMES = ("head", "decode_head")


def compile_options(spec: bool | str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Turn the ``compile`` config value into ``torch.compile`` keyword arguments (None = off).

    ``false`` / ``null``: off; ``true``: defaults (inductor); a string: a ``mode``
    (``max-autotune``, ...); a mapping: keyword arguments of ``torch.compile``
    (``{mode: max-autotune-no-cudagraphs, dynamic: false}``, ``{backend: aot_eager}``).
    """
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    if isinstance(spec, str):
        return {"mode": spec}
    if isinstance(spec, Mapping):
        allowed = ("mode", "backend", "dynamic", "fullgraph", "options")
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            raise ValueError(f"compile: unknown torch.compile option(s) {unknown}; expected {allowed}")
        return dict(spec)
    raise ValueError(f"compile: expected true, false, a mode string or a mapping, got {spec!r}")


def _is_block_stack(module: nn.Module) -> bool:
    members = list(module.children())
    return isinstance(module, nn.ModuleList) and bool(members) and len({type(m) for m in members}) == 1


def find_regions(module: nn.Module) -> list[str]:
    """Qualified names of the regions :func:`compile_regions` compiles, outermost first."""
    regions: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(r + ".") for r in regions):
            continue  # inside a region already
        if _is_block_stack(sub):
            regions += [f"{name}.{i}" if name else str(i) for i in range(len(sub))]
        elif name.rsplit(".", 1)[-1] in HEAD_NAMES:
            regions.append(name)
    return regions


def compile_regions(module: nn.Module, **options: Any) -> list[str]:
    """Compile every region of ``module`` in place (see the module docstring); returns their names.

    Args:
        module: any model: a LightningModule of this project, a backbone, backbone + head.
        options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).

    Compilation itself happens lazily, at the first call of each region (so the first training
    step is slow). Calling this twice recompiles nothing new: already compiled regions are kept.
    """
    regions = find_regions(module)
    for name in regions:
        region = module.get_submodule(name)
        if getattr(region, "_compiled_call_impl", None) is None:
            region.compile(**options)
    if regions:
        stacks = sorted({r.rsplit(".", 1)[0] for r in regions if r.rsplit(".", 1)[-1].isdigit()})
        heads = [r for r in regions if not r.rsplit(".", 1)[-1].isdigit()]
        log.info(
            "torch.compile (torch %s, %s): %d regions: block stacks %s, heads %s; compiled at first use",
            torch.__version__,
            options or "defaults",
            len(regions),
            stacks,
            heads,
        )
    else:
        log.warning("torch.compile: no block stack or head in %s; nothing compiled", type(module).__name__)
    return regions


def is_compiled(module: nn.Module) -> bool:
    """True when any submodule of ``module`` was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
