r"""Write a checkpoint of ours as ``.safetensors``, in our layout or the published one.

    python -m sapiens.checkpoints.export runs/pointmap/x/checkpoints/best.ckpt out.safetensors \
        [--layout published]

Input: a Lightning checkpoint of this project (or any file :func:`sapiens.checkpoints.read_checkpoint` reads).
``--layout ours`` keeps every key as trained (``backbone.*`` + ``task.head.*``, or ``model.encoder.*`` +
``model.decoder.*`` for MAE). ``--layout published`` writes what the published releases hold: a fine-tuned
model as ``backbone.<published names>`` + ``decode_head.*`` (Sapiens pose: ``head.*``), a pretraining run as
the unprefixed published encoder keys (the MAE decoder is not released, so it is left out).
Either file initialises a run (``task.init_from=out.safetensors``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sapiens.checkpoints import (
    BACKBONE_PREFIXES,
    extract_backbone_state,
    identify_checkpoint,
    read_checkpoint,
    to_published_layout,
    write_safetensors,
)
from sapiens.checkpoints.keys import strip_prefix

OUR_HEAD_PREFIX = "task.head."


def published_state(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our fine-tuning or pretraining state -> the family's published layout (module docstring)."""
    backbone = to_published_layout(
        extract_backbone_state(strip_prefix(state, BACKBONE_PREFIXES), family), family
    )
    head = {k[len(OUR_HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(OUR_HEAD_PREFIX)}
    if not head:
        return backbone
    head_prefix = "head." if family == "vit" and "final_layer.weight" in head else "decode_head."
    return {
        **{f"backbone.{k}": v for k, v in backbone.items()},
        **{head_prefix + k: v for k, v in head.items()},
    }


def export(source: str | Path, out: str | Path, layout: str = "ours") -> dict:
    """Write ``source`` as ``out`` (.safetensors) in ``layout``; returns what was identified in it."""
    state = read_checkpoint(source)
    info = identify_checkpoint(state)
    if info["family"] is None:
        raise ValueError(f"{source}: no Sapiens / Sapiens2 backbone found in the checkpoint")
    if layout == "published":
        state = published_state(state, info["family"])
    elif layout != "ours":
        raise ValueError(f"--layout must be 'ours' or 'published', got {layout!r}")
    metadata = {"family": info["family"], "size": info["size"], "layout": layout, "source": Path(source).name}
    if info["head"]:
        metadata["task"] = info["head"]["task"]
    write_safetensors(state, out, metadata)
    return {**info, "tensors": len(state)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sapiens.checkpoints.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt (or .pth / .safetensors) to convert")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--layout", choices=("ours", "published"), default="ours")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.layout)
    except (ValueError, FileNotFoundError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    head = info["head"]["task"] if info["head"] else "no head"
    what = f"{info['family']} {info['size'] or ''} ({head})"
    print(f"wrote {args.out}: {info['tensors']} tensors, {what}, layout {args.layout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
