"""Analytic ray casting of capsules and ellipsoids with numpy, plus normals and shading.

Camera frame (OpenCV): x right, y down, z forward, camera at the origin. Pixel (row i, col j)
covers [j, j+1) x [i, i+1) in image coordinates and its ray passes through its centre
(j + 0.5, i + 0.5); a 3D point projects to u = f x / z + cx, v = f y / z + cy, so it falls in
pixel (floor(v), floor(u)). Each primitive is intersected only with the rays of the pixels inside
its projected bounding box, which keeps the cost proportional to the covered area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.synthhumans.materials import CHECKER, STRIPES
from data.synthhumans.primitives import Primitive

NEAR = 0.05  # metres; primitives reaching closer than this to the camera are not drawn


@dataclass
class Intrinsics:
    """Pinhole camera: focal length in pixels, principal point and image size."""

    focal: float
    cx: float
    cy: float
    height: int
    width: int


def pixel_rays(cam: Intrinsics) -> np.ndarray:
    """Unit ray directions through the pixel centres, float64 (H, W, 3)."""
    u = (np.arange(cam.width) + 0.5 - cam.cx) / cam.focal
    v = (np.arange(cam.height) + 0.5 - cam.cy) / cam.focal
    rays = np.empty((cam.height, cam.width, 3))
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    rays[..., 2] = 1.0
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    return rays


def project(points: np.ndarray, cam: Intrinsics) -> np.ndarray:
    """Image coordinates (u, v) float64 (N, 2) of camera-frame points (N, 3) with z > 0."""
    return points[:, :2] / points[:, 2:3] * cam.focal + np.array([cam.cx, cam.cy])


def _extent(prim: Primitive) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned 3D box (lo, hi) containing the primitive."""
    if prim.kind == Primitive.CAPSULE:
        lo = np.minimum(prim.p0, prim.p1) - prim.radius
        hi = np.maximum(prim.p0, prim.p1) + prim.radius
        return lo, hi
    half = np.linalg.norm(prim.rot * prim.radii[None, :], axis=1)
    return prim.p0 - half, prim.p0 + half


def pixel_box(prim: Primitive, cam: Intrinsics) -> tuple[int, int, int, int] | None:
    """Conservative pixel box (row0, row1, col0, col1) of a primitive, or None if off-screen.

    x/z is monotonic in x and in z on the 3D box, so the extreme projections are at corners.
    """
    lo, hi = _extent(prim)
    if lo[2] < NEAR:
        return None
    us = [lo[0] / lo[2], lo[0] / hi[2], hi[0] / lo[2], hi[0] / hi[2]]
    vs = [lo[1] / lo[2], lo[1] / hi[2], hi[1] / lo[2], hi[1] / hi[2]]
    c0 = max(0, int(np.floor(min(us) * cam.focal + cam.cx)))
    c1 = min(cam.width, int(np.ceil(max(us) * cam.focal + cam.cx)) + 1)
    r0 = max(0, int(np.floor(min(vs) * cam.focal + cam.cy)))
    r1 = min(cam.height, int(np.ceil(max(vs) * cam.focal + cam.cy)) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def intersect_capsule(d: np.ndarray, a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Ray parameter t of the first hit of rays from the origin with a capsule.

    The capsule is the union of a finite cylinder and two end spheres; the first hit of a union
    of convex shapes is the smallest first hit among them.

    Args:
        d: float64 (..., 3) unit directions.
        a, b: float64 (3,) segment end points; r: radius.

    Returns:
        float64 (...) t > 0, ``inf`` where the ray misses.
    """
    ba = b - a
    baba = ba @ ba
    baoa = -(ba @ a)
    oaoa = a @ a
    bard = d @ ba
    rdoa = -(d @ a)
    qa = np.maximum(baba - bard * bard, 1e-12)
    qb = baba * rdoa - baoa * bard
    qc = baba * oaoa - baoa * baoa - r * r * baba
    disc = qb * qb - qa * qc
    t_body = (-qb - np.sqrt(np.maximum(disc, 0.0))) / qa
    along = baoa + t_body * bard
    t = np.where((disc >= 0) & (along > 0) & (along < baba), t_body, np.inf)
    # End spheres: |t d - c|^2 = r^2 with |d| = 1 -> t = (d.c) - sqrt((d.c)^2 - |c|^2 + r^2).
    for dc, cc in ((-rdoa, oaoa), (bard - rdoa, b @ b)):
        disc_s = dc * dc - cc + r * r
        t_s = dc - np.sqrt(np.maximum(disc_s, 0.0))
        t = np.where(disc_s >= 0, np.minimum(t, t_s), t)
    return np.where(t > 0, t, np.inf)


def intersect_ellipsoid(d: np.ndarray, center: np.ndarray, rot: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Ray parameter t of the first hit of rays from the origin with an ellipsoid.

    Args:
        d: float64 (..., 3) unit directions; center (3,); rot (3, 3) axes as columns;
            radii (3,) semi-axes.

    Returns:
        float64 (...) t > 0, ``inf`` where the ray misses.
    """
    to_unit = rot / radii[None, :]  # world vector -> unit-sphere coordinates
    dl = d @ to_unit
    ol = -(center @ to_unit)
    qa = np.sum(dl * dl, axis=-1)
    qb = dl @ ol
    qc = ol @ ol - 1.0
    disc = qb * qb - qa * qc
    t = (-qb - np.sqrt(np.maximum(disc, 0.0))) / qa
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def cast(prims: list[Primitive], rays: np.ndarray, cam: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer all primitives (camera frame).

    Returns:
        depth: float64 (H, W) camera z of the nearest surface, ``inf`` on background.
        index: int32 (H, W) index into ``prims`` of the nearest surface, -1 on background.
    """
    depth = np.full(rays.shape[:2], np.inf)
    index = np.full(rays.shape[:2], -1, dtype=np.int32)
    for k, prim in enumerate(prims):
        box = pixel_box(prim, cam)
        if box is None:
            continue
        r0, r1, c0, c1 = box
        sub = rays[r0:r1, c0:c1]
        if prim.kind == Primitive.CAPSULE:
            t = intersect_capsule(sub, prim.p0, prim.p1, prim.radius)
        else:
            t = intersect_ellipsoid(sub, prim.p0, prim.rot, prim.radii)
        z = t * sub[..., 2]
        depth_sub = depth[r0:r1, c0:c1]
        closer = z < depth_sub
        np.copyto(depth_sub, z, where=closer)
        np.copyto(index[r0:r1, c0:c1], k, where=closer)
    return depth, index


def surface_normals(
    prims: list[Primitive], points: np.ndarray, rays: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """Unit outward normals at surface points, oriented towards the camera.

    Args:
        prims: the primitives (camera frame).
        points: float64 (N, 3) hit points; rays: float64 (N, 3) their unit view rays;
        index: int (N,) primitive index of each point.

    Returns:
        float64 (N, 3) unit normals n with n . ray < 0.
    """
    kind = np.array([p.kind for p in prims])[index]
    p0 = np.stack([p.p0 for p in prims])[index]
    normals = np.empty_like(points)
    cap = kind == Primitive.CAPSULE
    if cap.any():
        axis = np.stack([p.p1 - p.p0 for p in prims])[index[cap]]
        rel = points[cap] - p0[cap]
        h = np.clip(np.sum(rel * axis, 1) / np.maximum(np.sum(axis * axis, 1), 1e-12), 0.0, 1.0)
        normals[cap] = rel - h[:, None] * axis
    ell = ~cap
    if ell.any():
        rot = np.stack([p.rot for p in prims])[index[ell]]
        radii = np.stack([p.radii for p in prims])[index[ell]]
        local = np.einsum("ni,nij->nj", points[ell] - p0[ell], rot)
        normals[ell] = np.einsum("nij,nj->ni", rot, local / radii**2)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Entry hits of convex shapes face the ray; rounding at grazing angles can leave a dot
    # product of ~0, so push those slightly towards the camera to keep n . ray < 0 exact.
    facing = np.sum(normals * rays, axis=1)
    bad = facing > -1e-4
    if bad.any():
        normals[bad] -= (facing[bad] + 1e-4)[:, None] * rays[bad]
        normals[bad] /= np.linalg.norm(normals[bad], axis=1, keepdims=True)
    return normals


def shade(
    prims: list[Primitive],
    points: np.ndarray,
    normals: np.ndarray,
    rays: np.ndarray,
    index: np.ndarray,
    light_dir: np.ndarray,
    light_color: np.ndarray,
    ambient: float,
) -> np.ndarray:
    """Blinn-Phong colours of surface points from their materials' patterned albedo.

    Args:
        points, normals, rays: float64 (N, 3); index: int (N,) primitive indices;
        light_dir: unit (3,) direction towards the light; light_color: (3,) RGB scale.

    Returns:
        float64 (N, 3) linear RGB, roughly 0..1.
    """
    mats = [p.material for p in prims]
    color = np.stack([m.color for m in mats])[index]
    color2 = np.stack([m.color2 for m in mats])[index]
    pattern = np.array([m.pattern for m in mats])[index]
    freq = np.array([m.frequency for m in mats])[index]
    phase = np.array([m.phase for m in mats])[index]
    spec_k = np.array([m.specular for m in mats])[index]
    patterned = pattern > 0
    albedo = color
    if patterned.any():
        rot = np.stack([p.rot for p in prims])[index[patterned]]
        p0 = np.stack([p.p0 for p in prims])[index[patterned]]
        local = np.einsum("ni,nij->nj", points[patterned] - p0, rot)
        f, ph = freq[patterned], phase[patterned]
        on = np.mod(local[:, 1] * f + ph, 1.0) < 0.5
        checker = pattern[patterned] == CHECKER
        on = np.where(checker, on ^ (np.mod(local[:, 0] * f, 1.0) < 0.5), on)
        on &= (pattern[patterned] == STRIPES) | checker
        albedo = color.copy()
        albedo[patterned] = np.where(on[:, None], color2[patterned], color[patterned])
    fronted = np.array([m.front_color is not None for m in mats])[index]
    if fronted.any():
        # Panel down the front: the +z side of the shape, within 55% of its half-width of the middle.
        sel = np.flatnonzero(fronted)
        rot = np.stack([p.rot for p in prims])[index[sel]]
        radii = np.stack([p.radii for p in prims])[index[sel]]
        local = np.einsum("ni,nij->nj", points[sel] - np.stack([p.p0 for p in prims])[index[sel]], rot)
        local /= radii
        panel = (local[:, 2] > 0.3) & (np.abs(local[:, 0]) < 0.55)
        front = np.stack([m.front_color if m.front_color is not None else m.color for m in mats])[index[sel]]
        albedo = albedo.copy()
        albedo[sel[panel]] = front[panel]
    diffuse = np.clip(normals @ light_dir, 0.0, 1.0)
    half = light_dir[None, :] - rays
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    highlight = np.clip(np.sum(normals * half, axis=1), 0.0, 1.0) ** 24
    lit = albedo * (ambient + (1.0 - ambient) * diffuse)[:, None] * light_color
    return lit + (spec_k * highlight)[:, None] * light_color
