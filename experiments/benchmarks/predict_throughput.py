"""Where does ``predict`` spend its time? Images/s and milliseconds per image in each stage.

    python -m experiments.benchmarks.predict_throughput --model vit_tiny --height 1024 --width 768 \
        --images 16 --batch 4 --tasks pose seg depth normal [--device cpu|cuda|auto]

For each task: a checkpoint of the model size (random weights: speed does not depend on them) with
heads ``--head-channels`` wide, then ``run_predict`` over ``--images`` JPEGs of the real Grace Hopper
photo (matplotlib's sample data) resized to the input size, writing every output (overlay JPEG, raw
arrays, JSON). A warm-up run on two images comes first. Stages (``meta.json``): decode (JPEG reading,
in the decoding threads), preprocess (resize / crop, host->device, normalise), model (forward passes,
two per pose crop with the flip test), postprocess (resize to the source, argmax / DARK decoding,
device->host), write (overlay drawing, encoding, files). ``all`` runs the four models in one pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import cv2
import torch

from experiments.benchmarks._common import load_backbone_shape, markdown_table
from sapiens.predict.pipeline import run_predict
from sapiens.predict.predictor import STAGES
from sapiens.predict.runners import select_device

TASKS = ("pose", "seg", "depth", "normal")


def write_checkpoint(task: str, backbone: dict, image_size: tuple[int, int], width: int, path: Path) -> Path:
    """A checkpoint of ``task`` as training writes it (random weights, heads ``width`` channels wide)."""
    from sapiens.lit.finetune import FinetuneModule
    from sapiens.tasks.depth import DepthTask
    from sapiens.tasks.normal import NormalTask
    from sapiens.tasks.pose import PoseTask
    from sapiens.tasks.segmentation import SegmentationTask

    heads = {
        "pose": partial(PoseTask, deconv_channels=(width,) * 2, conv_channels=(width,) * 2),
        "seg": partial(SegmentationTask, deconv_channels=(width,) * 3, conv_channels=(width,) * 3),
        "depth": partial(DepthTask, deconv_channels=(width,) * 4, conv_channels=(width,) * 2),
        "normal": partial(NormalTask, deconv_channels=(width,) * 3, conv_channels=(width,) * 3),
    }
    padding = {"pose": 2, "normal": 2}.get(task, 0)
    module = FinetuneModule(backbone, heads[task], image_size=image_size, patch_padding=padding)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def write_images(folder: Path, count: int, height: int, width: int) -> Path:
    """``count`` JPEGs (quality 90) of the Grace Hopper photo resized to height x width."""
    import matplotlib.cbook

    photo = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def measure(checkpoints: list[Path], images: Path, out: Path, args) -> dict:
    cfg = {
        "source": str(images),
        "checkpoint": [str(c) for c in checkpoints],
        "output_dir": str(out),
        "device": args.device,
        "batch_size": args.batch,
        "precision": args.precision,
        "num_workers": args.workers,
        "progress": False,
        "boxes": "full",
    }
    return run_predict(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny", help="a conf/model name")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--head-channels", type=int, default=64, help="width of every head layer")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--tasks", nargs="+", default=[*TASKS, "all"], choices=[*TASKS, "all"])
    args = parser.parse_args(argv)

    device = select_device(args.device)
    backbone = load_backbone_shape(args.model)
    size = (args.height, args.width)
    print(
        f"predict throughput: {args.model} (+ heads {args.head_channels} wide) at "
        f"{args.height}x{args.width}, {args.images} images of that size, batch {args.batch}, {device}, "
        f"{args.precision}, {torch.get_num_threads()} threads, {args.workers} decoding threads"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts = {t: write_checkpoint(t, backbone, size, args.head_channels, tmp / f"{t}.ckpt") for t in TASKS}
        images = write_images(tmp / "images", args.images, *size)
        warm = write_images(tmp / "warm", 2, *size)
        for task in args.tasks:
            chosen = [ckpts[t] for t in TASKS] if task == "all" else [ckpts[task]]
            measure(chosen, warm, tmp / f"warm_{task}", args)
            meta = measure(chosen, images, tmp / f"out_{task}", args)
            per = meta["ms_per_image"]
            other = sum(v for k, v in per.items() if k != "model")
            rows.append(
                [
                    task,
                    f"{meta['images_per_second']:.2f}",
                    *(f"{per[s]:.1f}" for s in STAGES),
                    f"{other:.1f}",
                    f"{other / max(per['model'], 1e-9):.2f}",
                ]
            )
    header = ["task", "images/s", *(f"{s} ms" for s in STAGES), "non-model ms", "non-model / model"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
