"""Build a ready-to-train SynthHumans root: raw train/val splits and the shards of all five tasks.

    python -m data.synthhumans.shards --root datasets/synthhumans --train 800 --val 120

Layout written (what ``conf/data/synthhumans.yaml`` reads):
    <root>/raw/{train,val}/...                       images, annotations, segs, depths, normals, masks
    <root>/shards/{pretrain,pose,seg,depth,normal,pointmap}/{train,val}/shard-NNNNNN.tar
A split that already has its shards is left alone, so re-running is cheap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data.converters.coco import convert_coco
from data.converters.dense import convert_dense
from data.converters.images import convert_images
from data.converters.pointmap import convert_pointmap
from data.converters.seg import convert_seg
from data.synthhumans.scene import SCENE_STYLES
from data.synthhumans.writer import SUBDIRS, generate_dataset

READERS = ("pretrain", "pose", "seg", "depth", "normal", "pointmap")


def build_split(
    root: Path,
    split: str,
    num: int,
    seed: int,
    height: int,
    width: int,
    max_count: int = 64,
    progress: bool = True,
    max_people: int = 3,
    workers: int = 1,
    readers: tuple[str, ...] = READERS,
    style: str = "full",
) -> dict[str, Path]:
    """Generate ``num`` images for ``split`` and write the shards of ``readers`` (default: every
    task); returns the shard folders. ``readers=("pretrain",)`` writes images only, no labels."""
    unknown = set(readers) - set(READERS)
    if unknown:
        raise ValueError(f"readers {sorted(unknown)} unknown; expected some of {READERS}")
    raw = root / "raw" / split
    shards = {r: root / "shards" / r / split for r in readers}
    labels = set(readers) != {"pretrain"}
    if all(any(p.glob("*.tar")) for p in shards.values() if p.exists()) and all(
        p.exists() for p in shards.values()
    ):
        return shards
    # A raw split from before a label kind existed (e.g. intrinsics) is rendered again.
    if not (raw / "annotations" / "person_keypoints.json").exists() or not all(
        (raw / d).is_dir() for d in SUBDIRS
    ):
        generate_dataset(
            raw,
            num,
            seed=seed,
            height=height,
            width=width,
            max_people=max_people,
            workers=workers,
            progress=progress,
            labels=labels,
            style=style,
        )
    opts = {"max_count": max_count, "overwrite": True, "progress": False}
    if "pretrain" in shards:
        convert_images(raw / "images", shards["pretrain"], **opts)
    if "pose" in shards:
        convert_coco(
            raw / "annotations" / "person_keypoints.json",
            raw / "images",
            shards["pose"],
            keypoint_set="body17",
            **opts,
        )
    if "seg" in shards:
        convert_seg(raw / "images", raw / "segs", shards["seg"], **opts)
    for task in ("depth", "normal"):
        if task in shards:
            folder = raw / f"{task}s"
            convert_dense(task, raw / "images", folder, shards[task], masks=raw / "masks", **opts)
    if "pointmap" in shards:
        convert_pointmap(
            raw / "images", raw / "depths", raw / "intrinsics", shards["pointmap"], raw / "masks", **opts
        )
    return shards


def build(
    root: str | Path,
    num_train: int = 800,
    num_val: int = 120,
    seed: int = 0,
    height: int = 256,
    width: int = 192,
    progress: bool = True,
    max_people: int = 3,
    workers: int = 1,
    style: str = "full",
    readers: tuple[str, ...] = READERS,
) -> Path:
    """Both splits (different seeds, so validation images are unseen) under ``root``; returns root.

    ``max_people``: people per image are drawn from 1..max_people; ``workers``: render processes;
    ``style``: ``full`` SynthHumans scenes or the easier ``simple`` ones (see ``scene.SCENE_STYLES``);
    ``readers``: the shard kinds to write (default: all of ``READERS``).
    """
    root = Path(root)
    start = time.perf_counter()
    opts = {"progress": progress, "max_people": max_people, "workers": workers, "style": style}
    opts["readers"] = readers
    build_split(root, "train", num_train, seed, height, width, **opts)
    build_split(root, "val", num_val, seed + 1_000_003, height, width, **opts)
    print(f"SynthHumans ready in {root} ({time.perf_counter() - start:.0f} s)")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="datasets/synthhumans")
    parser.add_argument("--train", type=int, default=800, help="training images")
    parser.add_argument("--val", type=int, default=120, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--max-people", type=int, default=3, help="people per image: 1..N")
    parser.add_argument("--workers", type=int, default=1, help="render processes")
    parser.add_argument("--style", default="full", choices=sorted(SCENE_STYLES), help="scene difficulty")
    args = parser.parse_args(argv)
    build(
        args.root,
        args.train,
        args.val,
        args.seed,
        args.height,
        args.width,
        max_people=args.max_people,
        workers=args.workers,
        style=args.style,
    )


if __name__ == "__main__":
    main()
