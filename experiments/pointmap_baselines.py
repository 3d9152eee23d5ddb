"""Trivial pointmap baselines, to read a trained pointmap model's metrics against.

    python -m experiments.pointmap_baselines --root datasets/synthhumans --size 128 96 --focal 96

Computed with the task's own targets and metrics (``sapiens.tasks.pointmap``) on the validation split:
- ``constant``: every pixel predicts the training split's mean canonical point, the scale its mean s;
- ``rays``: every pixel predicts the point at the training split's mean canonical depth on its own ray
  (X = (u - cx) Z / fx with the true intrinsics), the scale the mean s. This one knows the camera.
A model that does not beat ``constant`` has learnt nothing per image.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import torch

from sapiens.data.dense_transform import DenseTransform
from sapiens.data.readers import read_pointmap
from sapiens.losses_sapiens2 import pixel_grid
from sapiens.models.heads_sapiens2 import PointmapOutput
from sapiens.tasks.pointmap import PointmapTask

SHOWN = (
    "l2",
    "rmse",
    "within_10cm",
    "within_20cm",
    "normal_mean_angular_error",
    "depth_rmse",
    "scale_abs_rel",
)


def load_split(folder: Path, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every sample of the pointmap shards in ``folder``, resized as for validation, stacked."""
    transform = DenseTransform("pointmap", size, train=False)
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    items = [out for s in samples.values() if (out := transform(read_pointmap(s))) is not None]
    if not items:
        raise ValueError(f"no usable pointmap sample in {folder}")
    return {k: torch.stack([i[k] for i in items]) for k in ("depth", "mask", "intrinsics")}


def evaluate(task: PointmapTask, output: PointmapOutput, batch: dict) -> dict[str, float]:
    task.reset_metrics()
    task.update_metrics(output, batch)
    return {k: v for k, v in task.compute_metrics().items() if k in SHOWN}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/synthhumans"))
    parser.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"))
    parser.add_argument("--focal", type=float, default=96.0, help="canonical focal f_c of the task")
    args = parser.parse_args(argv)
    size = tuple(args.size)
    task = PointmapTask(8, size, head=lambda **kw: torch.nn.Identity(), canonical_focal=args.focal)
    train = load_split(args.root / "shards" / "pointmap" / "train", size)
    val = load_split(args.root / "shards" / "pointmap" / "val", size)
    points, scale, valid = task.targets(train)
    mean_point = (points * valid[:, None]).sum((0, 2, 3)) / valid.sum()
    n = val["depth"].shape[0]
    mean_scale = scale.mean().expand(n, 1)
    constant = PointmapOutput(mean_point.view(1, 3, 1, 1).expand(n, 3, *size), mean_scale)
    k = val["intrinsics"]
    u, v = pixel_grid(*size, k.device)
    z = mean_point[2]
    fx, fy, cx, cy = (k[:, i, j, None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    rays = torch.stack([(u - cx) / fx * z, (v - cy) / fy * z, z.expand(n, *size)], dim=1)
    print(f"{len(scale)} train / {n} val images at {size[0]}x{size[1]}; mean canonical Z {float(z):.3f}")
    for name, output in (("constant", constant), ("rays", PointmapOutput(rays, mean_scale))):
        values = evaluate(task, output, val)
        print(f"{name:9s}", "  ".join(f"{k} {values[k]:.3f}" for k in SHOWN))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
