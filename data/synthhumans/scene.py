"""One SynthHumans sample: people, camera, light, background, and every label rendered exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from data.synthhumans.background import sample_background
from data.synthhumans.body import NUM_BODY_KEYPOINTS, Person, build_person
from data.synthhumans.render import (
    Intrinsics,
    cast,
    pixel_rays,
    project,
    shade,
    surface_normals,
)

MIN_SEPARATION = 0.6  # metres between people's pelvis ground points
# People in photographs mostly face the camera: this share faces it within +-FACING_SPREAD radians,
# the others face any direction (the camera looks along +z, so a yaw of pi faces it).
FACING_CAMERA_PROB = 0.7
FACING_SPREAD = 1.0


@dataclass(frozen=True)
class SceneStyle:
    """How hard the scenes are. ``full`` is SynthHumans proper; ``simple`` is the demo data:
    plain backgrounds, poses nearer neutral, more people facing the camera (see README)."""

    clutter: bool = True  # textured backgrounds and clutter shapes
    pose_spread: float = 1.0  # scale on the joint-angle spread around the neutral pose
    uniform_pose_prob: float = 0.25  # share of people with uniformly random joint angles
    facing_camera_prob: float = FACING_CAMERA_PROB


SCENE_STYLES = {
    "full": SceneStyle(),
    "simple": SceneStyle(clutter=False, pose_spread=0.5, uniform_pose_prob=0.0, facing_camera_prob=0.9),
}


def scene_style(name: str) -> SceneStyle:
    """The named ``SceneStyle``; a one-line error for an unknown name."""
    if name not in SCENE_STYLES:
        raise ValueError(f"scene style {name!r} unknown; expected one of {sorted(SCENE_STYLES)}")
    return SCENE_STYLES[name]


def sample_yaw(rng: np.random.Generator, facing_camera_prob: float = FACING_CAMERA_PROB) -> float:
    """A person's facing direction (radians about +y): mostly towards the camera, else uniform."""
    if rng.random() < facing_camera_prob:
        return float(np.pi + rng.uniform(-FACING_SPREAD, FACING_SPREAD))
    return float(rng.uniform(0, 2 * np.pi))


def _look_at(position: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """World -> camera rotation (rows: right, down, forward) looking at ``target``."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    c, s = np.cos(roll), np.sin(roll)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ rot


def _place_people(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Ground positions (3,) for ``count`` people: the first at the origin, others around it."""
    spots = [np.zeros(3)]
    for _ in range(30 * count):
        if len(spots) == count:
            break
        cand = np.array([rng.uniform(-1.3, 1.3), 0.0, rng.uniform(-1.5, 2.5)])
        if all(np.linalg.norm(cand - s) >= MIN_SEPARATION for s in spots):
            spots.append(cand)
    return spots


def _keypoint_labels(
    person: Person,
    kp_cam: np.ndarray,
    cam: Intrinsics,
    depth: np.ndarray,
    instance: np.ndarray,
    instance_id: int,
) -> np.ndarray:
    """COCO keypoints (K, 3) [x, y, v] of one person, v from the depth and instance buffers.

    v = 0: outside the image (x = y = 0); v = 2: the first surface at the keypoint's pixel
    belongs to this person and lies within the body thickness around the keypoint; v = 1 else.
    """
    uv = np.round(project(kp_cam, cam), 2)
    out = np.zeros((len(uv), 3))
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
    inside &= kp_cam[:, 2] > 0
    for k in np.flatnonzero(inside):
        col, row = int(np.floor(uv[k, 0])), int(np.floor(uv[k, 1]))
        own = instance[row, col] == instance_id
        seen = own and depth[row, col] >= kp_cam[k, 2] - person.tolerance[k]
        out[k] = (uv[k, 0], uv[k, 1], 2 if seen else 1)
    return out


def render_sample(
    seed: int | np.random.Generator,
    height: int = 256,
    width: int = 192,
    max_people: int = 3,
    style: str = "full",
) -> dict[str, Any]:
    """Render one random image with exact labels.

    Args:
        seed: integer seed or a numpy Generator (consumed).
        height, width: image size in pixels.
        max_people: people per image are drawn uniformly from 1..max_people.
        style: a ``SCENE_STYLES`` name (``full`` or the easier ``simple``).

    Returns:
        dict with
        ``image`` uint8 (H, W, 3) RGB; ``seg`` uint8 (H, W) Goliath part ids (0 background);
        ``depth`` float32 (H, W) camera z in metres, 0 on background; ``normal`` float32
        (H, W, 3) unit camera-frame normals (x right, y down, z forward) facing the camera, 0 on
        background; ``mask`` uint8 (H, W) 0/255 foreground; ``instance`` uint8 (H, W)
        0 background, i + 1 for ``persons[i]``; ``persons``: list (people with at least one
        pixel) of dicts with ``keypoints`` float64 (17, 3), ``foot_kpts`` float64 (6, 3)
        [x, y, v] rows, ``bbox`` [x, y, w, h] (tight pixel box), ``area`` (pixel count);
        ``camera`` dict (focal, cx, cy; the ray of pixel (i, j) passes through (j + 0.5, i + 0.5));
        ``pointmap`` float32 (H, W, 3) the exact camera-frame hit points (0 on background) and
        ``intrinsics`` {fx, fy, cx, cy} in the OpenCV convention (pixel centres at integers, so
        cx = camera cx - 0.5): X = (j - cx) Z / fx exactly.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    look = scene_style(style)
    count = int(rng.integers(1, max_people + 1))
    people = [
        build_person(
            rng, pos, sample_yaw(rng, look.facing_camera_prob), i, look.pose_spread, look.uniform_pose_prob
        )
        for i, pos in enumerate(_place_people(rng, count))
    ]

    # Camera aimed at the first person, zoomed so they fill a random share of the frame.
    main = people[0]
    target = main.keypoints.mean(axis=0) + rng.normal(0, 0.12, 3)
    distance = rng.uniform(2.5, 7.0)
    azimuth = rng.uniform(-0.5, 0.5)
    cam_pos = np.array(
        [target[0] + distance * np.sin(azimuth), rng.uniform(0.3, 2.4), -distance * np.cos(azimuth)]
    )
    rot = _look_at(cam_pos, target, rng.uniform(-0.3, 0.3))
    trans = -rot @ cam_pos
    extent = np.ptp(main.keypoints[:, 1]) + 0.25
    fill = rng.uniform(0.5, 0.95)
    focal = fill * height * np.linalg.norm(target - cam_pos) / extent
    cam = Intrinsics(focal, width / 2 + rng.normal(0, 2), height / 2 + rng.normal(0, 2), height, width)

    prims, kept = [], []
    for person in people:
        moved = [p.transformed(rot, trans) for p in person.primitives]
        # Drop anyone the camera would be inside or nearly touching.
        if min(min(p.p0[2], p.p1[2]) - p.radius for p in moved) < 0.3:
            continue
        kept.append((person, len(kept)))
        for p in moved:
            p.person = len(kept) - 1
        prims.extend(moved)

    rays = pixel_rays(cam)
    depth, index = cast(prims, rays, cam)
    fg = index >= 0
    part = np.array([p.part for p in prims] + [0], dtype=np.uint8)
    owner = np.array([p.person + 1 for p in prims] + [0], dtype=np.int32)
    seg = part[index]  # index -1 picks the trailing 0
    instance = owner[index]

    fg_rays = rays[fg]
    fg_depth = depth[fg]
    points = fg_rays * (fg_depth / fg_rays[:, 2])[:, None]
    fg_index = index[fg]
    normals = surface_normals(prims, points, fg_rays, fg_index)
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1.2, 0.3), -rng.uniform(0.3, 1.2)])
    light /= np.linalg.norm(light)
    light_color = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.25)
    colors = shade(prims, points, normals, fg_rays, fg_index, light, light_color, rng.uniform(0.2, 0.55))

    image = sample_background(rng, height, width, look.clutter)
    image[fg] = colors
    if rng.random() < 0.2:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.0))
    image = image + rng.normal(0, rng.uniform(0.0, 0.025), image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

    depth_out = np.zeros((height, width), np.float32)
    depth_out[fg] = fg_depth
    normal_out = np.zeros((height, width, 3), np.float32)
    normal_out[fg] = normals
    pointmap = np.zeros((height, width, 3), np.float32)
    pointmap[fg] = points

    persons, relabel = [], np.zeros(len(kept) + 1, dtype=np.uint8)
    for person, i in kept:
        area = int(np.count_nonzero(instance == i + 1))
        if area == 0:
            continue
        relabel[i + 1] = len(persons) + 1
        kp_cam = person.keypoints @ rot.T + trans
        kps = _keypoint_labels(person, kp_cam, cam, depth_out, instance, i + 1)
        rows, cols = np.nonzero(instance == i + 1)
        bbox = [int(cols.min()), int(rows.min())]
        bbox += [int(cols.max()) + 1 - bbox[0], int(rows.max()) + 1 - bbox[1]]
        persons.append(
            {
                "keypoints": kps[:NUM_BODY_KEYPOINTS],
                "foot_kpts": kps[NUM_BODY_KEYPOINTS:],
                "bbox": bbox,
                "area": area,
            }
        )
    return {
        "image": image,
        "seg": seg,
        "depth": depth_out,
        "normal": normal_out,
        "mask": (fg * 255).astype(np.uint8),
        "instance": relabel[instance],
        "persons": persons,
        "camera": {"focal": float(cam.focal), "cx": float(cam.cx), "cy": float(cam.cy)},
        "pointmap": pointmap,
        "intrinsics": {"fx": cam.focal, "fy": cam.focal, "cx": cam.cx - 0.5, "cy": cam.cy - 0.5},
    }
