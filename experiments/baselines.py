"""Trivial baselines for the four fine-tuning tasks, scored exactly like a model on its validation set.

    python -m experiments.baselines runs/pose/demo runs/seg/demo runs/depth/demo runs/normal/demo

Each baseline predicts one constant, fitted on the run's training shards (read without augmentation)
and fed through the run's own task metric on its validation shards, so the numbers sit beside the
model's as a floor it has to clear:

* pose: the mean pose, i.e. the mean of the labelled training keypoints in crop coordinates, placed
  in every validation box (as heatmaps through the task's decoder and COCOeval, flip test off);
* seg: the most frequent training class (background) everywhere;
* depth: a constant depth, which the scale-and-shift alignment turns into each image's optimal
  constant (its mean foreground depth), so the RMSE is the per-image depth spread;
* normal: the mean training foreground normal everywhere.

Depth has a second, harder yardstick (``mean_depth_map_metrics``): the mean training depth map, one fixed
(H, W) picture of the normalised foreground depth whatever the image, which the alignment scales (with
either sign) and shifts per image. Like the mean pose it uses nothing of the image, yet it captures the
usual top-to-bottom slope of a standing person's depth; a depth model has to beat it to have learned
anything from the pixels.

The run's resolved ``config.yaml`` defines the data, the transforms and the metric.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sapiens.data.datamodule import ShardDataModule
from sapiens.losses import normalize_depth_foreground
from sapiens.run import build_transform
from sapiens.tasks.base import Task

# task -> (metric key in compute_metrics(), what the baseline predicts)
BASELINES = {
    "pose": ("AP", "mean pose"),
    "seg": ("mIoU", "most frequent class"),
    "depth": ("rmse", "optimal constant depth"),
    "normal": ("mean_angular_error", "mean normal"),
}


MEAN_DEPTH_MAP = "mean depth map (image-independent)"


def _batches(cfg, shards: str, limit: int | None = None) -> Iterator[dict]:
    """Ordered, un-augmented batches of ``shards`` through the run's validation transform."""
    module = ShardDataModule(
        train_shards=None,
        val_shards=shards,
        reader=cfg.task.reader,
        val_transform=build_transform(cfg.task.val_transform, "cpu"),
        batch_size=cfg.data.batch_size,
        num_workers=0,
    )
    for i, batch in enumerate(module.val_dataloader()):
        if limit is not None and i >= limit:
            break
        yield batch


def _build_task(cfg) -> Task:
    """The run's task (head, codec, metric), without loading any checkpoint or writing results."""
    spec = OmegaConf.to_container(cfg.task.task_head, resolve=True)
    if "results_file" in spec:
        spec["results_file"] = None
    return instantiate(spec)(in_channels=8, image_size=tuple(cfg.task.image_size))


def _constant_outputs(task: Task, batch: dict, value: torch.Tensor) -> torch.Tensor:
    """The baseline's raw "head output" for ``batch``: ``value`` broadcast to the task's layout."""
    size = batch["image"].shape[-2:]
    b = batch["image"].shape[0]
    if task.name == "pose":
        return value.expand(b, *value.shape)
    return value.view(1, -1, 1, 1).expand(b, -1, *size)


def fit_constant(task: Task, cfg, max_batches: int | None = None) -> torch.Tensor:
    """The constant each baseline predicts, from the training shards (un-augmented)."""
    shards = cfg.data.train_shards
    if task.name == "pose":
        total, count = 0.0, 0.0
        for batch in _batches(cfg, shards, max_batches):
            xy, _ = task.codec.decode(batch["heatmaps"].float())  # crop keypoints of the targets
            w = batch["target_weight"].numpy()[..., None]
            total = total + (xy * w).sum(0)
            count = count + w.sum(0)
        mean_xy = total / np.maximum(count, 1)
        heatmaps, _ = task.codec.encode(mean_xy, (count[:, 0] > 0).astype(np.float32))
        return torch.from_numpy(heatmaps)
    if task.name == "seg":
        counts = torch.zeros(256, dtype=torch.float64)
        for batch in _batches(cfg, shards, max_batches):
            counts += torch.bincount(batch["seg"].flatten().long(), minlength=256).double()[:256]
        counts[255] = 0  # ignore label
        logits = torch.full((task.classes.num_classes,), -10.0)
        logits[int(counts.argmax())] = 10.0
        return logits
    if task.name == "depth":
        return torch.ones(1)
    if task.name == "normal":
        total = torch.zeros(3, dtype=torch.float64)
        for batch in _batches(cfg, shards, max_batches):
            fg = batch["mask"].bool()
            total += batch["normal"].permute(0, 2, 3, 1)[fg].double().sum(0)
        return (total / total.norm().clamp(min=1e-12)).float()
    raise ValueError(f"no baseline for task {task.name!r}")


def _load_run(run_dir: str | Path) -> tuple[DictConfig, Task]:
    """(resolved config, task) of the fine-tuning run in ``run_dir``; a clear error if it is not one."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no resolved config (is {run_dir} a run directory?)")
    cfg = OmegaConf.load(path)
    return cfg, _build_task(cfg)


def _score(task: Task, cfg, outputs: Callable[[dict], torch.Tensor]) -> dict[str, float]:
    """The task's metrics over the validation shards for ``outputs(batch)``, the raw head output."""
    for batch in _batches(cfg, cfg.data.val_shards):
        task.update_metrics(outputs(batch), batch)
    metrics = task.compute_metrics()
    task.reset_metrics()
    return metrics


def fit_mean_depth_map(cfg, max_batches: int | None = None) -> torch.Tensor:
    """(H, W) mean of the foreground-normalised training depth (the training target) over the images where
    each pixel is foreground; pixels never on a person get the overall foreground mean."""
    total, count = None, None
    for batch in _batches(cfg, cfg.data.train_shards, max_batches):
        fg = batch["mask"].bool()
        target = normalize_depth_foreground(batch["depth"], fg)
        batch_total = torch.where(fg, target, torch.zeros_like(target)).double().sum(0)
        batch_count = fg.double().sum(0)
        total = batch_total if total is None else total + batch_total
        count = batch_count if count is None else count + batch_count
    if total is None:
        raise ValueError(f"{cfg.data.train_shards}: no training batches to fit the mean depth map on")
    overall = total.sum() / count.sum().clamp(min=1)
    return torch.where(count > 0, total / count.clamp(min=1), overall).float()


def mean_depth_map_metrics(run_dir: str | Path, max_batches: int | None = None) -> dict[str, float]:
    """The depth run's metrics for the mean training depth map predicted for every validation image."""
    cfg, task = _load_run(run_dir)
    if task.name != "depth":
        raise ValueError(f"{run_dir}: a {task.name} run; the mean depth map is a depth baseline")
    depth_map = fit_mean_depth_map(cfg, max_batches)
    return _score(task, cfg, lambda batch: depth_map.expand(batch["image"].shape[0], 1, *depth_map.shape))


def baseline_metrics(run_dir: str | Path, max_batches: int | None = None) -> dict[str, float]:
    """Fit the trivial baseline of the run in ``run_dir`` and score it on the run's validation shards.

    Returns the task's metrics (the same keys a model logs under ``val/``) plus ``"baseline"``, a
    one-line description of what was predicted.
    """
    cfg, task = _load_run(run_dir)
    if task.name == "pose":
        task.flip_test = False
        task.prepare_validation(ShardDataModule(train_shards=None, val_shards=cfg.data.val_shards))
    value = fit_constant(task, cfg, max_batches)
    metrics = _score(task, cfg, lambda batch: _constant_outputs(task, batch, value))
    return {**metrics, "baseline": BASELINES[task.name][1]}


def yardsticks(task: str, run_dir: str | Path, max_batches: int | None = None) -> list[tuple[str, float]]:
    """(what it predicts, the task's main metric ``BASELINES[task][0]``) of each image-independent baseline
    of the ``task`` run in ``run_dir``: first its trivial baseline (``baseline_metrics``), then, for depth,
    the harder mean training depth map. The demo's and the study's tables both show these."""
    metric = BASELINES[task][0]
    rows = [(BASELINES[task][1], baseline_metrics(run_dir, max_batches)[metric])]
    if task == "depth":
        rows.append((MEAN_DEPTH_MAP, mean_depth_map_metrics(run_dir, max_batches)[metric]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="fine-tuning run directories (holding config.yaml)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        metrics = baseline_metrics(run_dir)
        name = OmegaConf.load(Path(run_dir) / "config.yaml").task.name
        key = BASELINES[name][0]
        print(f"{name}: {metrics['baseline']}: {key} {metrics[key]:.4f}")
        if name == "depth":
            print(f"depth: {MEAN_DEPTH_MAP}: rmse {mean_depth_map_metrics(run_dir)['rmse']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
