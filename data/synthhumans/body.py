"""Articulated 3D people: random proportions, poses within joint limits, primitives and keypoints.

World frame: metres, +y up, ground at y = 0. A person's own frame before its global rotation:
+x = the person's anatomical LEFT, +y = up, +z = the direction the person faces (right-handed).
Every joint angle below is sampled inside a stated range, so poses stay anatomically plausible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.synthhumans.materials import Material, PersonLook, sample_look
from data.synthhumans.primitives import Primitive, capsule, ellipsoid

# COCO-17 body keypoints followed by the 6 COCO-WholeBody foot keypoints.
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel",
)  # fmt: skip
NUM_BODY_KEYPOINTS = 17
NUM_FOOT_KEYPOINTS = 6

# Goliath part ids used by the generator.
FACE_NECK, HAIR, TORSO, UPPER_CLOTHING, LOWER_CLOTHING = 2, 3, 21, 22, 12
PART_IDS = {  # side -> limb -> Goliath id ("left" = anatomical left)
    "left": {
        "upper_arm": 10, "lower_arm": 6, "hand": 5, "upper_leg": 11, "lower_leg": 7, "foot": 4,
    },
    "right": {
        "upper_arm": 19, "lower_arm": 15, "hand": 14, "upper_leg": 20, "lower_leg": 16, "foot": 13,
    },
}  # fmt: skip
RENDERED_PART_IDS = (0, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22)

# Joint limits in radians: name -> (low, high, neutral). Signs are for the LEFT side; the right
# side mirrors abduction and twist.
JOINT_LIMITS = {
    "torso_bend": (-0.3, 0.8, 0.05), "torso_side": (-0.3, 0.3, 0.0),
    "torso_twist": (-0.5, 0.5, 0.0), "head_yaw": (-1.1, 1.1, 0.0),
    "head_pitch": (-0.5, 0.6, 0.0), "head_roll": (-0.3, 0.3, 0.0),
    "shoulder_abduction": (-0.2, 2.8, 0.2), "shoulder_flexion": (-0.7, 2.8, 0.1),
    "shoulder_twist": (-1.0, 1.0, 0.0), "elbow_flexion": (0.0, 2.4, 0.3),
    "wrist_twist": (-1.5, 1.5, 0.0), "hip_flexion": (-0.4, 1.9, 0.05),
    "hip_abduction": (-0.25, 0.8, 0.08), "hip_twist": (-0.6, 0.6, 0.0),
    "knee_flexion": (0.0, 2.3, 0.1), "ankle_flexion": (-0.4, 0.6, 0.0),
}  # fmt: skip
SIDED_JOINTS = (
    "shoulder_abduction", "shoulder_flexion", "shoulder_twist", "elbow_flexion", "wrist_twist",
    "hip_flexion", "hip_abduction", "hip_twist", "knee_flexion", "ankle_flexion",
)  # fmt: skip


def rot_x(a: float) -> np.ndarray:
    """3x3 rotation about +x by ``a`` radians."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(a: float) -> np.ndarray:
    """3x3 rotation about +y by ``a`` radians."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(a: float) -> np.ndarray:
    """3x3 rotation about +z by ``a`` radians."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Proportions:
    """Segment lengths and radii in metres."""

    height: float
    girth: float
    upper_leg: float
    lower_leg: float
    ankle_height: float
    torso: float
    neck: float
    head_radii: np.ndarray
    shoulder_width: float
    hip_width: float
    upper_arm: float
    lower_arm: float
    hand: float
    foot: float
    r_upper_arm: float
    r_lower_arm: float
    r_upper_leg: float
    r_lower_leg: float
    r_neck: float
    chest_depth: float


def sample_proportions(rng: np.random.Generator) -> Proportions:
    """Random adult/teen body proportions (height 1.35-1.98 m, girth factor 0.8-1.35)."""
    h = float(rng.uniform(1.35, 1.98))
    g = float(rng.uniform(0.8, 1.35))

    def j(x: float) -> float:  # per-segment jitter keeps bodies from looking cloned
        return x * float(rng.uniform(0.93, 1.07))

    head_scale = float(rng.uniform(0.92, 1.1)) * (1.75 / h) ** 0.3 * h / 1.75
    return Proportions(
        height=h,
        girth=g,
        upper_leg=j(0.245 * h),
        lower_leg=j(0.235 * h),
        ankle_height=0.04 * h,
        torso=j(0.30 * h),
        neck=j(0.045 * h),
        head_radii=np.array([0.075, 0.105, 0.092]) * head_scale,
        shoulder_width=j(0.215 * h) * (0.9 + 0.1 * g),
        hip_width=j(0.10 * h) * (0.85 + 0.15 * g),
        upper_arm=j(0.17 * h),
        lower_arm=j(0.145 * h),
        hand=j(0.1 * h),
        foot=j(0.15 * h),
        r_upper_arm=0.026 * h * g,
        r_lower_arm=0.021 * h * g,
        r_upper_leg=0.040 * h * g,
        r_lower_leg=0.029 * h * g,
        r_neck=0.03 * h * (0.8 + 0.2 * g),
        chest_depth=0.06 * h * g,
    )


def sample_pose(
    rng: np.random.Generator, spread_scale: float = 1.0, uniform_prob: float = 0.25
) -> dict[str, float]:
    """Joint angles inside ``JOINT_LIMITS``: a noisy neutral pose or, ``uniform_prob`` of the time,
    uniform. ``spread_scale`` < 1 keeps the noisy poses nearer neutral (the ``simple`` scenes).

    Returns:
        name -> radians for the unsided joints and ``left_<name>`` / ``right_<name>`` for the
        sided ones; every value within its limits.
    """
    spread = float(rng.uniform(0.15, 0.7)) * spread_scale
    uniform = rng.random() < uniform_prob
    names = [n for n in JOINT_LIMITS if n not in SIDED_JOINTS]
    names += [f"{s}_{n}" for s in ("left", "right") for n in SIDED_JOINTS]
    pose = {}
    for name in names:
        lo, hi, neutral = JOINT_LIMITS[name.removeprefix("left_").removeprefix("right_")]
        if uniform:
            pose[name] = float(rng.uniform(lo, hi))
        else:
            pose[name] = float(np.clip(neutral + rng.normal(0.0, spread * (hi - lo) / 2), lo, hi))
    return pose


@dataclass
class Person:
    """One posed person in world coordinates.

    Attributes:
        keypoints: float64 (23, 3) world positions in ``KEYPOINT_NAMES`` order.
        tolerance: float64 (23,) how far (m) in front of a keypoint the first surface of the same
            person may lie for the keypoint to count as visible (body thickness around it).
        primitives: the shapes that make up the body.
    """

    keypoints: np.ndarray
    tolerance: np.ndarray
    primitives: list[Primitive] = field(default_factory=list)


def _on_ellipsoid(center: np.ndarray, rot: np.ndarray, radii: np.ndarray, direction) -> np.ndarray:
    """The surface point of an ellipsoid along a local direction (3,) from its centre."""
    d = np.asarray(direction, dtype=np.float64)
    scale = 1.0 / np.sqrt(np.sum((d / radii) ** 2))
    return center + rot @ (d * scale)


def build_person(
    rng: np.random.Generator,
    position: np.ndarray,
    yaw: float,
    person_id: int,
    pose_spread: float = 1.0,
    uniform_pose_prob: float = 0.25,
) -> Person:
    """Sample proportions, pose and look, and build the posed person standing at ``position``.

    Args:
        rng: random generator (consumed deterministically).
        position: float (3,) ground point under the pelvis (y is recomputed so feet touch y=0).
        yaw: facing direction in radians about +y (0 = facing +z).
        person_id: index stored in every primitive.
        pose_spread, uniform_pose_prob: see ``sample_pose``.
    """
    p = sample_proportions(rng)
    pose = sample_pose(rng, pose_spread, uniform_pose_prob)
    look = sample_look(rng)
    body_rot = rot_y(yaw) @ rot_x(rng.uniform(-0.08, 0.08)) @ rot_z(rng.uniform(-0.08, 0.08))
    pelvis = np.zeros(3)
    prims: list[Primitive] = []
    kp = {}
    tol = {}

    torso_rot = body_rot @ rot_x(pose["torso_bend"]) @ rot_z(pose["torso_side"]) @ rot_y(pose["torso_twist"])
    up = torso_rot[:, 1]
    neck_base = pelvis + up * p.torso
    shirt = look.upper if look.shirt else look.skin
    shirt_part = UPPER_CLOTHING if look.shirt else TORSO
    # Torso = chest + belly (+ a bar joining the shoulders); the pelvis is wearing lower clothing.
    chest_r = np.array([p.shoulder_width * 0.5, p.torso * 0.33, p.chest_depth])
    prims.append(ellipsoid(pelvis + up * p.torso * 0.66, torso_rot, chest_r, shirt_part, shirt))
    belly_r = np.array([p.hip_width * 0.5 + p.r_upper_leg * 0.8, p.torso * 0.3, p.chest_depth])
    prims.append(ellipsoid(pelvis + up * p.torso * 0.32, torso_rot, belly_r * 0.95, shirt_part, shirt))
    hips_r = np.array([p.hip_width * 0.5 + p.r_upper_leg, p.torso * 0.17, p.chest_depth * 1.02])
    prims.append(ellipsoid(pelvis + up * p.torso * 0.1, torso_rot, hips_r, LOWER_CLOTHING, look.lower))

    side_x = {"left": 1.0, "right": -1.0}
    shoulder_y = p.torso * 0.92
    shoulders = {
        s: pelvis + torso_rot @ np.array([sx * p.shoulder_width * 0.5, shoulder_y, 0.0])
        for s, sx in side_x.items()
    }
    prims.append(capsule(shoulders["left"], shoulders["right"], p.r_upper_arm * 1.15, shirt_part, shirt))

    # Neck and head.
    head_rot = torso_rot @ rot_y(pose["head_yaw"]) @ rot_x(pose["head_pitch"]) @ rot_z(pose["head_roll"])
    hr = p.head_radii
    head_c = neck_base + head_rot @ np.array([0.0, p.neck + hr[1] * 0.75, 0.01])
    prims.append(capsule(neck_base - up * 0.02, head_c, p.r_neck, FACE_NECK, look.skin))
    prims.append(ellipsoid(head_c, head_rot, hr, FACE_NECK, look.skin))
    nose_base = _on_ellipsoid(head_c, head_rot, hr, (0.0, -0.15, 1.0))
    nose_r = hr[0] * 0.18
    nose_c = nose_base + head_rot @ np.array([0.0, 0.0, nose_r * 0.4])
    prims.append(ellipsoid(nose_c, head_rot, np.full(3, nose_r), FACE_NECK, look.skin))
    kp["nose"] = nose_c + head_rot @ np.array([0.0, 0.0, nose_r])
    eye_r = hr[0] * np.array([0.2, 0.14, 0.1])
    for s, sx in side_x.items():
        kp[f"{s}_eye"] = _on_ellipsoid(head_c, head_rot, hr, (sx * 0.38, 0.12, 0.9))
        kp[f"{s}_ear"] = _on_ellipsoid(head_c, head_rot, hr, (sx * 1.0, 0.0, -0.05))
        # Dark eyes and (below) a mouth: a face that shows which way the head points.
        prims.append(ellipsoid(kp[f"{s}_eye"], head_rot, eye_r, FACE_NECK, look.eyes))
    mouth_c = _on_ellipsoid(head_c, head_rot, hr, (0.0, -0.5, 0.85))
    mouth_r = hr[0] * np.array([0.32, 0.09, 0.12])
    prims.append(ellipsoid(mouth_c, head_rot, mouth_r, FACE_NECK, look.mouth))
    if look.hair_style > 0:
        # Hair: an ellipsoid shifted up and back so the face stays uncovered.
        hair_r = hr * np.array([1.07, 1.06, 1.05])
        shift = np.array([0.0, 0.22, -0.22]) if look.hair_style == 1 else np.array([0, 0.12, -0.2])
        prims.append(ellipsoid(head_c + head_rot @ (shift * hr), head_rot, hair_r, HAIR, look.hair))
        if look.hair_style == 2:  # long hair down the back
            back_c = head_c + head_rot @ np.array([0.0, -hr[1] * 0.7, -hr[2] * 0.55])
            back_r = np.array([hr[0] * 1.0, hr[1] * 1.05, hr[2] * 0.45])
            prims.append(ellipsoid(back_c, head_rot, back_r, HAIR, look.hair))

    surface_tol = 0.02 * p.height / 1.75
    for k in ("nose", "left_eye", "right_eye", "left_ear", "right_ear"):
        tol[k] = surface_tol

    for s, sx in side_x.items():
        ids = PART_IDS[s]
        # Arm: abduction about the forward axis, flexion about the left axis, twist about itself.
        ua_rot = (
            torso_rot
            @ rot_z(sx * pose[f"{s}_shoulder_abduction"])
            @ rot_x(-pose[f"{s}_shoulder_flexion"])
            @ rot_y(sx * pose[f"{s}_shoulder_twist"])
        )
        la_rot = ua_rot @ rot_x(-pose[f"{s}_elbow_flexion"])
        hand_rot = la_rot @ rot_y(sx * pose[f"{s}_wrist_twist"])
        sh = shoulders[s]
        elbow = sh - ua_rot[:, 1] * p.upper_arm
        wrist = elbow - la_rot[:, 1] * p.lower_arm
        kp[f"{s}_shoulder"], kp[f"{s}_elbow"], kp[f"{s}_wrist"] = sh, elbow, wrist
        tol[f"{s}_shoulder"] = p.chest_depth + surface_tol
        sleeve = look.sleeve  # 0 none, 1 short, 2 long
        ua_part = UPPER_CLOTHING if sleeve == 2 and look.shirt else ids["upper_arm"]
        ua_mat = look.upper if ua_part == UPPER_CLOTHING else look.skin
        la_part = UPPER_CLOTHING if sleeve == 2 and look.shirt else ids["lower_arm"]
        la_mat = look.upper if la_part == UPPER_CLOTHING else look.skin
        r_ua = p.r_upper_arm * (1.1 if ua_part == UPPER_CLOTHING else 1.0)
        r_la = p.r_lower_arm * (1.1 if la_part == UPPER_CLOTHING else 1.0)
        prims.append(capsule(sh, elbow, r_ua, ua_part, ua_mat, ua_rot))
        if sleeve == 1 and look.shirt:
            sleeve_end = sh + (elbow - sh) * 0.5
            prims.append(capsule(sh, sleeve_end, r_ua * 1.18, UPPER_CLOTHING, look.upper, ua_rot))
        prims.append(capsule(elbow, wrist, r_la, la_part, la_mat, la_rot))
        hand_r = np.array([p.r_lower_arm * 1.05, p.hand * 0.5, p.r_lower_arm * 0.6])
        hand_c = wrist - hand_rot[:, 1] * (p.hand * 0.45)
        prims.append(ellipsoid(hand_c, hand_rot, hand_r, ids["hand"], look.skin))
        tol[f"{s}_elbow"] = r_ua * 1.2 + surface_tol
        tol[f"{s}_wrist"] = r_la * 1.2 + surface_tol

        # Leg.
        ul_rot = (
            body_rot
            @ rot_z(sx * pose[f"{s}_hip_abduction"])
            @ rot_x(-pose[f"{s}_hip_flexion"])
            @ rot_y(sx * pose[f"{s}_hip_twist"])
        )
        ll_rot = ul_rot @ rot_x(pose[f"{s}_knee_flexion"])
        foot_rot = ll_rot @ rot_x(pose[f"{s}_ankle_flexion"])
        hip = pelvis + body_rot @ np.array([sx * p.hip_width * 0.5, 0.0, 0.0])
        knee = hip - ul_rot[:, 1] * p.upper_leg
        ankle = knee - ll_rot[:, 1] * p.lower_leg
        kp[f"{s}_hip"], kp[f"{s}_knee"], kp[f"{s}_ankle"] = hip, knee, ankle
        tol[f"{s}_hip"] = p.chest_depth + surface_tol
        long_pants = look.long_pants
        ul_part = LOWER_CLOTHING if long_pants else ids["upper_leg"]
        ll_part = LOWER_CLOTHING if long_pants else ids["lower_leg"]
        ul_mat = look.lower if long_pants else look.skin
        ll_mat = look.lower if long_pants else look.skin
        prims.append(capsule(hip, knee, p.r_upper_leg, ul_part, ul_mat, ul_rot))
        if not long_pants:  # shorts cover the top of the thigh
            shorts_end = hip + (knee - hip) * float(rng.uniform(0.3, 0.7))
            prims.append(capsule(hip, shorts_end, p.r_upper_leg * 1.12, LOWER_CLOTHING, look.lower, ul_rot))
        prims.append(capsule(knee, ankle, p.r_lower_leg, ll_part, ll_mat, ll_rot))
        tol[f"{s}_knee"] = p.r_upper_leg * 1.1 + surface_tol
        tol[f"{s}_ankle"] = p.r_lower_leg * 1.1 + surface_tol

        # Foot: an ellipsoid from the heel to the toes below the ankle.
        foot_r = np.array([p.foot * 0.2, p.ankle_height * 0.55, p.foot * 0.55])
        foot_c = ankle + foot_rot @ np.array([0.0, -p.ankle_height * 0.6, p.foot * 0.3])
        prims.append(ellipsoid(foot_c, foot_rot, foot_r, ids["foot"], look.shoes))
        medial = -sx  # the big toe sits towards the body's midline
        kp[f"{s}_big_toe"] = _on_ellipsoid(foot_c, foot_rot, foot_r, (medial * 0.35, 0.0, 1.0))
        kp[f"{s}_small_toe"] = _on_ellipsoid(foot_c, foot_rot, foot_r, (-medial * 0.8, 0.0, 0.7))
        kp[f"{s}_heel"] = _on_ellipsoid(foot_c, foot_rot, foot_r, (0.0, -0.3, -1.0))
        for k in ("big_toe", "small_toe", "heel"):
            tol[f"{s}_{k}"] = surface_tol

    keypoints = np.stack([kp[n] for n in KEYPOINT_NAMES])
    tolerance = np.array([tol[n] for n in KEYPOINT_NAMES])
    # Stand on the ground: lowest foot point at y = 0, then move to the requested position.
    lowest = min(_lowest_y(pr) for pr in prims)
    offset = np.asarray(position, dtype=np.float64) - np.array([0.0, lowest, 0.0])
    offset[1] = -lowest
    for pr in prims:
        pr.translate(offset)
    for pr in prims:
        pr.person = person_id
    return Person(keypoints=keypoints + offset, tolerance=tolerance, primitives=prims)


def _lowest_y(prim: Primitive) -> float:
    """Lowest world y reached by a primitive (exact for both kinds)."""
    if prim.kind == Primitive.CAPSULE:
        return float(min(prim.p0[1], prim.p1[1]) - prim.radius)
    # For an ellipsoid x = c + R diag(r) u, |u| = 1: the y extent is |row_y(R) * r|.
    return float(prim.p0[1] - np.linalg.norm(prim.rot[1] * prim.radii))


__all__ = [
    "KEYPOINT_NAMES",
    "Material",
    "Person",
    "PersonLook",
    "build_person",
    "sample_pose",
    "sample_proportions",
]
