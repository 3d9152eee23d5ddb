"""``coco`` subcommand: pose shards (``jpg`` + ``json``) from a COCO / COCO-WholeBody keypoint file.

    python -m data.make_shards coco --ann person_keypoints.json --images DIR --out OUT
        [--keypoints body17|body_foot23|wholebody133] [--keep-empty] [--skip-bad] ...

One sample per image holding all of its person annotations (schema in sapiens/data/readers.py). The
keypoint rows concatenate the annotation fields of the chosen set, in COCO-WholeBody order:
body17 = keypoints; body_foot23 = + foot_kpts; wholebody133 = + face_kpts + lefthand_kpts +
righthand_kpts. Images without annotations are skipped unless ``--keep-empty``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data.converters.seg import add_shard_arguments, read_image, shard_options, write_shards
from sapiens.data.shard_writer import ShardWriteSummary

KEYPOINT_FIELDS = {
    "body17": (("keypoints", 17),),
    "body_foot23": (("keypoints", 17), ("foot_kpts", 6)),
    "wholebody133": (
        ("keypoints", 17),
        ("foot_kpts", 6),
        ("face_kpts", 68),
        ("lefthand_kpts", 21),
        ("righthand_kpts", 21),
    ),
}


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read and structurally check a COCO keypoint JSON file.

    Raises:
        FileNotFoundError: missing file. ValueError: invalid JSON or missing/ill-typed
            ``images`` / ``annotations`` entries, naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: missing or non-list '{key}' (is this a COCO keypoint file?)")
    for i, entry in enumerate(coco["images"]):
        if not isinstance(entry, dict) or not {"id", "file_name"} <= entry.keys():
            raise ValueError(f"{path}: images[{i}] needs at least 'id' and 'file_name'")
    known = {entry["id"] for entry in coco["images"]}
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{path}: annotations[{i}] has no 'image_id'")
        if ann["image_id"] not in known:
            raise ValueError(f"{path}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
    return coco


def person_record(ann: dict[str, Any], keypoint_set: str, where: str) -> dict[str, Any]:
    """One ``persons`` entry of the pose schema from a COCO annotation.

    Raises:
        ValueError: a missing or wrong-length keypoint field or a bad bbox, naming ``where``.
    """
    rows: list[list[float]] = []
    for field, count in KEYPOINT_FIELDS[keypoint_set]:
        values = ann.get(field)
        if values is None:
            raise ValueError(
                f"{where} has no '{field}', which --keypoints {keypoint_set} needs; "
                "use a smaller keypoint set (e.g. body17) for plain COCO files"
            )
        if not isinstance(values, list) or len(values) != 3 * count:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{where}: '{field}' must hold {3 * count} numbers, got {size}")
        for k in range(count):
            x, y, v = values[3 * k : 3 * k + 3]
            rows.append([float(x), float(y), int(v)])
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
    return {
        "id": int(ann.get("id", 0)),
        "bbox": [float(b) for b in bbox],
        "area": float(ann.get("area", bbox[2] * bbox[3])),
        "iscrowd": int(ann.get("iscrowd", 0)),
        "keypoints": rows,
    }


def convert_coco(
    ann_file: str | Path,
    images: str | Path,
    out: str | Path,
    keypoint_set: str = "body17",
    keep_empty: bool = False,
    **shard_opts: Any,
) -> ShardWriteSummary:
    """Write pose shards from a COCO(-WholeBody) keypoint file (see module docstring).

    ``shard_opts`` are passed to :func:`data.converters.seg.write_shards`.
    """
    if keypoint_set not in KEYPOINT_FIELDS:
        raise ValueError(f"--keypoints must be one of {sorted(KEYPOINT_FIELDS)}, got {keypoint_set}")
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    coco = load_coco(ann_file)
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    entries = sorted(coco["images"], key=lambda e: e["id"])

    def make(entry: dict[str, Any]) -> dict[str, Any] | None:
        anns = by_image.get(entry["id"], [])
        if not anns and not keep_empty:
            return None
        path = images / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image of image_id {entry['id']} is missing")
        jpg, (height, width) = read_image(path)
        if (entry.get("width", width), entry.get("height", height)) != (width, height):
            raise ValueError(
                f"{path}: image is {width}x{height} (WxH) but {ann_file} says "
                f"{entry.get('width')}x{entry.get('height')}"
            )
        persons = [person_record(a, keypoint_set, f"{ann_file}: annotation id {a.get('id')}") for a in anns]
        meta = {
            "image_id": int(entry["id"]),
            "file_name": str(entry["file_name"]),
            "width": width,
            "height": height,
            "persons": persons,
        }
        return {"__key__": f"{int(entry['id']):012d}", "jpg": jpg, "json": json.dumps(meta)}

    return write_shards(entries, make, out, "coco -> shards", **shard_opts)


def run(args: argparse.Namespace) -> int:
    convert_coco(
        args.ann,
        args.images,
        args.out,
        keypoint_set=args.keypoints,
        keep_empty=args.keep_empty,
        **shard_options(args),
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``coco``."""
    parser = subparsers.add_parser(
        "coco",
        help="pose shards (jpg + json) from a COCO / COCO-WholeBody keypoint file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ann", required=True, help="COCO keypoint JSON file")
    parser.add_argument("--images", required=True, help="image folder (file_name relative to it)")
    parser.add_argument(
        "--keypoints", choices=sorted(KEYPOINT_FIELDS), default="body17", help="fields to use"
    )
    parser.add_argument("--keep-empty", action="store_true", help="keep images without persons")
    add_shard_arguments(parser)
    parser.set_defaults(func=run)
