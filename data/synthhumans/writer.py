"""Generate a SynthHumans dataset on disk in the raw (official custom-data) layout.

root/images/NNNNNN.jpg, root/annotations/person_keypoints.json (COCO keypoints with COCO-WholeBody
style ``foot_kpts``), root/segs/NNNNNN.png, root/depths/NNNNNN.npy, root/normals/NNNNNN.npy,
root/masks/NNNNNN.png, root/intrinsics/NNNNNN.json ({fx, fy, cx, cy}, OpenCV pixel-centre convention) and
root/pointmaps/NNNNNN.npy (exact camera-frame XYZ, (H, W, 3), 0 on background). NNNNNN is the COCO image id
(sample index + 1).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg
from pycocotools import mask as mask_utils
from tqdm import tqdm

from data.synthhumans.body import KEYPOINT_NAMES, NUM_BODY_KEYPOINTS
from data.synthhumans.scene import render_sample, scene_style

JPEG_QUALITY = 92
SUBDIRS = ("images", "annotations", "segs", "depths", "normals", "masks", "intrinsics", "pointmaps")
ANNOTATION_FILE = "annotations/person_keypoints.json"


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``: independent of worker count and of other samples."""
    return np.random.default_rng([int(seed), int(index)])


def _coco_category() -> dict[str, Any]:
    from sapiens.labels import load_keypoint_set

    coco = load_keypoint_set("coco17")
    if list(coco.names) != list(KEYPOINT_NAMES[:NUM_BODY_KEYPOINTS]):
        raise ValueError(f"{coco.source}: keypoint order differs from the generator's COCO-17 order")
    return {
        "id": 1,
        "name": "person",
        "supercategory": "person",
        "keypoints": list(coco.names),
        "skeleton": [[int(a) + 1, int(b) + 1] for a, b in coco.skeleton],  # COCO is 1-based
    }


def _flat(kps: np.ndarray) -> list[float]:
    """[x1, y1, v1, ...] with integer visibilities."""
    out: list[float] = []
    for x, y, v in kps:
        out += [float(x), float(y), int(v)]
    return out


def write_sample(
    root: Path, image_id: int, sample: dict[str, Any], labels: bool = True
) -> tuple[dict, list[dict]]:
    """Write one rendered sample's files; return its COCO image entry and person annotations.

    Annotations carry every COCO field except ``id`` (assigned once all samples are known).
    ``labels=False`` writes the JPEG only (no part, mask, depth or normal files): unlabelled
    pretraining images at a fraction of the disk space.
    """
    stem = f"{image_id:06d}"
    image = sample["image"]
    height, width = image.shape[:2]
    (root / "images" / f"{stem}.jpg").write_bytes(
        simplejpeg.encode_jpeg(image, quality=JPEG_QUALITY, colorspace="RGB")
    )
    entry = {"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height}
    if not labels:
        return entry, []
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    cv2.imwrite(str(root / "segs" / f"{stem}.png"), sample["seg"], png)
    cv2.imwrite(str(root / "masks" / f"{stem}.png"), sample["mask"], png)
    np.save(root / "depths" / f"{stem}.npy", sample["depth"])
    np.save(root / "normals" / f"{stem}.npy", sample["normal"])
    np.save(root / "pointmaps" / f"{stem}.npy", sample["pointmap"])
    intrinsics = {k: float(v) for k, v in sample["intrinsics"].items()}
    (root / "intrinsics" / f"{stem}.json").write_text(json.dumps(intrinsics))
    anns = []
    for i, person in enumerate(sample["persons"]):
        rle = mask_utils.encode(np.asfortranarray(sample["instance"] == i + 1, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        kps, foot = person["keypoints"], person["foot_kpts"]
        anns.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "bbox": [float(v) for v in person["bbox"]],
                "area": float(person["area"]),
                "iscrowd": 0,
                "segmentation": rle,
                "num_keypoints": int(np.count_nonzero(kps[:, 2] > 0)),
                "keypoints": _flat(kps),
                "foot_kpts": _flat(foot),
                "foot_valid": bool(np.any(foot[:, 2] > 0)),
            }
        )
    return entry, anns


def _work(job: tuple[str, int, int, int, int, int, bool, str]) -> tuple[dict, list[dict]]:
    root, seed, index, height, width, max_people, labels, style = job
    sample = render_sample(sample_rng(seed, index), height, width, max_people, style)
    return write_sample(Path(root), index + 1, sample, labels)


def generate_dataset(
    out: str | Path,
    num: int,
    seed: int = 0,
    height: int = 256,
    width: int = 192,
    max_people: int = 3,
    workers: int = 1,
    progress: bool = True,
    labels: bool = True,
    style: str = "full",
) -> dict[str, Any]:
    """Render ``num`` samples into ``out`` (raw layout) and write the COCO keypoint file.

    Output is identical for a seed whatever ``workers`` is (each sample has its own generator).
    ``labels=False`` writes images only (and a COCO file without annotations). ``style``: a
    ``scene.SCENE_STYLES`` name (``full``, or ``simple`` for the demo).

    Returns:
        summary dict: ``images``, ``persons``, ``seconds``, ``images_per_s``, ``annotation_file``.
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ValueError(f"image size must be within 16..4096 pixels, got {height}x{width}")
    if max_people < 1:
        raise ValueError(f"--max-people must be >= 1, got {max_people}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    root = Path(out)
    for sub in SUBDIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    scene_style(style)  # an unknown style fails here, not in a worker
    jobs = [(str(root), seed, i, height, width, max_people, labels, style) for i in range(num)]
    start = time.perf_counter()
    bar = tqdm(total=num, desc="SynthHumans", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_work(job))
            bar.update(1)
    else:
        # Spawn keeps workers free of the parent's threads/locks; imap keeps index order.
        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap(_work, jobs, chunksize=max(1, min(32, num // (workers * 8)))):
                results.append(res)
                bar.update(1)
    bar.close()

    images, annotations = [], []
    for entry, anns in results:
        images.append(entry)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
    coco = {
        "info": {"description": "SynthHumans procedural people", "seed": seed, "style": style},
        "images": images,
        "annotations": annotations,
        "categories": [_coco_category()],
    }
    ann_path = root / ANNOTATION_FILE
    ann_path.write_text(json.dumps(coco))
    seconds = time.perf_counter() - start
    return {
        "images": num,
        "persons": len(annotations),
        "seconds": seconds,
        "images_per_s": num / seconds if seconds > 0 else float("inf"),
        "annotation_file": str(ann_path),
    }
