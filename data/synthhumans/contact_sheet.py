"""Contact sheet of a raw SynthHumans (or same-layout) dataset: every label drawn next to its image.

Per sample, four panels: image with skeleton (green = visible, orange = occluded keypoints),
part ids in the Goliath palette, depth (turbo colormap, near = red), normals as RGB ((n+1)/2).
CLI: ``python -m data.synthhumans.contact_sheet --root DIR --out sheet.png [--num 8]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from sapiens.labels import load_class_list, load_keypoint_set

VISIBLE, OCCLUDED = (40, 230, 40), (255, 150, 0)


def _draw_skeleton(image: np.ndarray, kps: np.ndarray, links: list[tuple[int, int]]) -> None:
    """Draw keypoints (K, 3) [x, y, v] and links on an RGB uint8 image in place."""
    scale = max(1, round(image.shape[0] / 256))
    for a, b in links:
        if kps[a, 2] > 0 and kps[b, 2] > 0:
            pa, pb = tuple(int(v) for v in kps[a, :2]), tuple(int(v) for v in kps[b, :2])
            cv2.line(image, pa, pb, (255, 255, 255), scale, lineType=cv2.LINE_AA)
    for x, y, v in kps:
        if v > 0:
            color = VISIBLE if v == 2 else OCCLUDED
            cv2.circle(image, (int(x), int(y)), 2 * scale, color, -1, lineType=cv2.LINE_AA)


def _depth_panel(depth: np.ndarray) -> np.ndarray:
    """Turbo colouring of depth (H, W) float on its foreground range; background dark grey."""
    fg = depth > 0
    out = np.full(depth.shape + (3,), 50, np.uint8)
    if fg.any():
        lo, hi = float(depth[fg].min()), float(depth[fg].max())
        norm = 1.0 - (depth - lo) / max(hi - lo, 1e-6)  # near = warm
        colored = cv2.applyColorMap((np.clip(norm, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
        out[fg] = colored[..., ::-1][fg]
    return out


def _normal_panel(normal: np.ndarray) -> np.ndarray:
    """Normals (H, W, 3) shown as RGB (n + 1) / 2; background black."""
    fg = np.any(normal != 0, axis=-1)
    out = np.zeros(normal.shape, np.uint8)
    out[fg] = ((normal[fg] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return out


def render_contact_sheet(root: str | Path, num: int = 8, per_row: int = 2) -> np.ndarray:
    """The sheet of the first ``num`` images of a raw dataset: RGB uint8 (H, W, 3)."""
    root = Path(root)
    ann_path = root / "annotations" / "person_keypoints.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path} not found: --root must hold annotations/ and images/")
    coco = json.loads(ann_path.read_text())
    palette = load_class_list("goliath_parts28").palette
    links = list(load_keypoint_set("body_foot23").skeleton)
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    blocks = []
    for entry in sorted(coco["images"], key=lambda e: e["id"])[:num]:
        stem = Path(entry["file_name"]).stem
        image = simplejpeg.decode_jpeg((root / "images" / entry["file_name"]).read_bytes())
        image = np.ascontiguousarray(image)
        for ann in by_image.get(entry["id"], []):
            kps = np.array(ann["keypoints"] + ann.get("foot_kpts", [0] * 18), float).reshape(-1, 3)
            _draw_skeleton(image, kps, links)
        seg = cv2.imread(str(root / "segs" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        depth = np.load(root / "depths" / f"{stem}.npy")
        normal = np.load(root / "normals" / f"{stem}.npy")
        panels = [image, palette[seg], _depth_panel(depth), _normal_panel(normal)]
        blocks.append(np.concatenate(panels, axis=1))
    if not blocks:
        raise ValueError(f"{ann_path} lists no images")
    while len(blocks) % per_row:
        blocks.append(np.zeros_like(blocks[0]))
    gap = np.full((blocks[0].shape[0], 6, 3), 255, np.uint8)
    rows = []
    for i in range(0, len(blocks), per_row):
        parts = []
        for b in blocks[i : i + per_row]:
            parts += [b, gap]
        rows.append(np.concatenate(parts[:-1], axis=1))
    return np.concatenate(rows, axis=0)


def write_contact_sheet(
    root: str | Path, out: str | Path, num: int = 8, per_row: int = 2, scale: float = 1.0
) -> Path:
    """Write the contact sheet PNG (optionally resized by ``scale``); returns its path."""
    sheet = render_contact_sheet(root, num, per_row)
    if scale != 1.0:
        size = (round(sheet.shape[1] * scale), round(sheet.shape[0] * scale))
        sheet = cv2.resize(sheet, size, interpolation=cv2.INTER_AREA)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m data.synthhumans.contact_sheet")
    ap.add_argument("--root", required=True, help="raw dataset root")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--num", type=int, default=8, help="samples to show")
    ap.add_argument("--per-row", type=int, default=2, help="samples per row")
    ap.add_argument("--scale", type=float, default=1.0, help="resize factor of the sheet")
    args = ap.parse_args(argv)
    try:
        path = write_contact_sheet(args.root, args.out, args.num, args.per_row, args.scale)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
