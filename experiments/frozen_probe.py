"""Frozen-backbone linear probes: what does a pretrained encoder's patch features tell, without fine-tuning?

    python -m experiments.frozen_probe --data-root runs/study/datasets/synthhumans --model vit_small \
        --image-size 128 96 --ckpt mae=runs/pretrain/mae/checkpoints/last.ckpt \
        --ckpt distill=runs/pretrain_distill/distill/checkpoints/last.ckpt --ckpt random=none --out probe.md

The backbone (fine-tuning role, as ``task.init_from`` loads it; the teacher of a distillation checkpoint
unless ``--weights student``) is frozen; its patch features (B, D, H/16, W/16) are computed once for the
train and val splits of SynthHumans' seg and depth shards (no augmentation), standardised per channel, and a
1x1 linear layer is trained on them (AdamW, full-resolution loss on bilinearly upsampled outputs):

- seg: 28 part logits, cross-entropy (ignore 255) -> val mIoU (``SegmentationMetrics``);
- depth: 1 channel, the depth task's SiLog loss on foreground-normalised depth -> val RMSE after per-image
  scale-and-shift alignment (``DepthMetrics``).

Trivial baselines are printed beside them: seg predicts the most frequent training class everywhere; depth
predicts a constant (aligned to each image's mean depth). This is DINOv2's linear dense evaluation in
miniature; it measures the features themselves, where fine-tuning can make up for a poor start.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sapiens.checkpoints import load_backbone_state
from sapiens.data.dense_transform import DenseTransform
from sapiens.data.normalize import normalize_images
from sapiens.data.shards import build_eval_pipeline
from sapiens.losses import SiLogLoss, normalize_depth_foreground
from sapiens.metrics.depth import DepthMetrics
from sapiens.metrics.segmentation import SegmentationMetrics
from sapiens.models.factory import build_backbone

NUM_PARTS = 28


@dataclass
class Split:
    """Frozen features (N, D, h, w) of one split and its labels (seg: (N, H, W) long; depth + mask)."""

    features: torch.Tensor
    labels: dict[str, torch.Tensor]


def load_model_shape(name: str) -> dict:
    """``conf/model/<name>.yaml`` -> its ``backbone`` dict."""
    from experiments.benchmarks._common import load_backbone_shape

    return load_backbone_shape(name)


@torch.no_grad()
def extract(backbone: torch.nn.Module, shards: Path, task: str, size: tuple[int, int], batch: int) -> Split:
    """Features and labels of every sample in ``shards`` (one ordered pass, no augmentation)."""
    loader = build_eval_pipeline(
        str(shards), batch, task, DenseTransform(task, size, train=False), num_workers=0
    )
    feats, labels = [], {}
    for b in loader:
        feats.append(backbone(normalize_images(b["image"])).float())
        for key in ("seg", "depth", "mask"):
            if key in b:
                labels.setdefault(key, []).append(torch.as_tensor(b[key]))
    return Split(torch.cat(feats), {k: torch.cat(v) for k, v in labels.items()})


def train_probe(
    task: str, train: Split, val: Split, epochs: int, seed: int, lr: float = 1e-2, stride: int = 4
) -> float:
    """Fit a 1x1 linear layer on ``train``; return val mIoU (seg) or aligned RMSE (depth).

    The training loss compares outputs with the labels subsampled by ``stride`` (every ``stride``-th pixel),
    16x cheaper at 4 than at full resolution, for a layer whose output has only the patch grid's detail
    anyway; validation is at full resolution."""
    torch.manual_seed(seed)
    mean = train.features.mean(dim=(0, 2, 3), keepdim=True)
    std = train.features.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    x_train, x_val = (train.features - mean) / std, (val.features - mean) / std
    out_channels = NUM_PARTS if task == "seg" else 1
    probe = torch.nn.Conv2d(x_train.shape[1], out_channels, 1)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    silog = SiLogLoss()
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    size = (train.labels["seg"] if task == "seg" else train.labels["depth"]).shape[-2:]
    # every stride-th label pixel, and the outputs upsampled to that coarser grid (its pixel centres sit
    # within half a full-resolution pixel of the labels taken)
    labels = {k: v[..., stride // 2 :: stride, stride // 2 :: stride] for k, v in train.labels.items()}
    coarse = tuple(labels["seg" if task == "seg" else "depth"].shape[-2:])
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(32):
            out = F.interpolate(probe(x_train[idx]), size=coarse, mode="bilinear", align_corners=False)
            if task == "seg":
                loss = F.cross_entropy(out, labels["seg"][idx].long(), ignore_index=255)
            else:
                target = normalize_depth_foreground(labels["depth"][idx], labels["mask"][idx])
                loss = silog(out, target, labels["mask"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = F.interpolate(probe(x_val), size=size, mode="bilinear", align_corners=False)
    return evaluate(task, out, val)


def evaluate(task: str, out: torch.Tensor, val: Split) -> float:
    if task == "seg":
        metric = SegmentationMetrics(NUM_PARTS)
        metric.update(out, val.labels["seg"].long())
        return float(metric.compute()["mIoU"])
    metric = DepthMetrics()
    metric.update(out, val.labels["depth"], val.labels["mask"])
    return float(metric.compute()["rmse"])


def baseline(task: str, train: Split, val: Split) -> float:
    """Most frequent training class everywhere (seg); a constant, aligned per image (depth)."""
    if task == "seg":
        labels = train.labels["seg"].long()
        counts = torch.bincount(labels[labels != 255], minlength=NUM_PARTS)
        pred = torch.full_like(val.labels["seg"].long(), int(counts.argmax()))
        out = F.one_hot(pred, NUM_PARTS).permute(0, 3, 1, 2).float()
        return evaluate(task, out, val)
    return evaluate(task, torch.zeros(val.labels["depth"].shape[0], 1, *val.labels["depth"].shape[-2:]), val)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root", type=Path, required=True, help="a SynthHumans root (shards/<task>/{train,val})"
    )
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"))
    parser.add_argument(
        "--ckpt", action="append", required=True, metavar="NAME=PATH", help="NAME=none: random initialisation"
    )
    parser.add_argument("--weights", choices=["teacher", "student"], default="teacher")
    parser.add_argument("--tasks", nargs="+", default=["seg", "depth"], choices=["seg", "depth"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="probe seeds (random init: also the init)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    shape = load_model_shape(args.model)
    size = tuple(args.image_size)
    results: dict[tuple[str, str], list[float]] = {}
    baselines: dict[str, float] = {}
    start = time.perf_counter()
    for spec in args.ckpt:
        name, _, path = spec.partition("=")
        for seed in args.seeds:
            torch.manual_seed(seed)
            backbone = build_backbone(shape, "finetune", size, patch_padding=0).eval()
            if path.lower() != "none":
                load_backbone_state(backbone, path, weights=args.weights)
            for task in args.tasks:
                root = args.data_root / "shards" / task
                train = extract(backbone, root / "train", task, size, args.batch)
                val = extract(backbone, root / "val", task, size, args.batch)
                if task not in baselines:
                    baselines[task] = baseline(task, train, val)
                results.setdefault((name, task), []).append(train_probe(task, train, val, args.epochs, seed))
                print(f"{name} seed {seed} {task}: {results[(name, task)][-1]:.4f}", flush=True)
    table = render(results, baselines, args)
    print(f"\n{table}\n({time.perf_counter() - start:.0f} s)")
    if args.out is not None:
        args.out.write_text(table + "\n")
    return results


def render(results: dict, baselines: dict, args: argparse.Namespace) -> str:
    """Markdown table: mean +- std over seeds per checkpoint and task, then the trivial baselines."""
    label = {"seg": "seg mIoU (higher is better)", "depth": "depth RMSE (lower is better)"}
    names = list(dict.fromkeys(n for n, _ in results))
    lines = [
        f"Frozen `{args.model}` at {args.image_size[0]}x{args.image_size[1]}, linear 1x1 probe, "
        f"{args.epochs} epochs, seeds {args.seeds}, {args.weights} weights of distillation checkpoints",
        "",
        "| backbone | " + " | ".join(label[t] for t in args.tasks) + " |",
        "|---|" + "---|" * len(args.tasks),
    ]
    for name in names:
        cells = []
        for task in args.tasks:
            values = torch.tensor(results[(name, task)])
            std = f" +- {values.std():.4f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.4f}{std}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| trivial baseline | " + " | ".join(f"{baselines[t]:.4f}" for t in args.tasks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
