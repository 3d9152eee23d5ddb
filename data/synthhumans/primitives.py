"""Shape primitives of the procedural people: capsules and ellipsoids (spheres are ellipsoids)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.synthhumans.materials import Material


@dataclass
class Primitive:
    """One convex shape with a body-part label and a material.

    Attributes:
        kind: ``CAPSULE`` (segment p0-p1 swept by a sphere of ``radius``) or ``ELLIPSOID``
            (centre p0, local axes = columns of ``rot``, semi-axes ``radii``).
        p0, p1: float64 (3,) points (p1 == p0 for ellipsoids).
        radius: capsule radius (m); for ellipsoids the largest semi-axis.
        rot: float64 (3, 3) local frame (columns); for capsules column 1 is the segment axis.
            Also the texture frame.
        radii: float64 (3,) semi-axes (capsules: radius repeated).
        part: Goliath body-part id.
        material: surface colours and pattern.
        person: index of the person it belongs to.
    """

    CAPSULE = 0
    ELLIPSOID = 1

    kind: int
    p0: np.ndarray
    p1: np.ndarray
    radius: float
    rot: np.ndarray
    radii: np.ndarray
    part: int
    material: Material
    person: int = 0

    def translate(self, offset: np.ndarray) -> None:
        """Move the shape by ``offset`` (3,) in place."""
        self.p0 = self.p0 + offset
        self.p1 = self.p1 + offset

    def transformed(self, rotation: np.ndarray, translation: np.ndarray) -> Primitive:
        """A copy under x -> rotation @ x + translation (e.g. world -> camera)."""
        return Primitive(
            kind=self.kind,
            p0=rotation @ self.p0 + translation,
            p1=rotation @ self.p1 + translation,
            radius=self.radius,
            rot=rotation @ self.rot,
            radii=self.radii,
            part=self.part,
            material=self.material,
            person=self.person,
        )


def _frame_along(axis: np.ndarray) -> np.ndarray:
    """An orthonormal frame (3, 3) whose column 1 is ``axis`` (normalised)."""
    y = axis / max(np.linalg.norm(axis), 1e-12)
    helper = np.array([1.0, 0.0, 0.0]) if abs(y[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    x = np.cross(y, helper)
    x /= np.linalg.norm(x)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=1)


def capsule(
    p0: np.ndarray,
    p1: np.ndarray,
    radius: float,
    part: int,
    material: Material,
    frame: np.ndarray | None = None,
) -> Primitive:
    """A capsule from p0 to p1 (float (3,)) with a texture frame (defaults to one along p1-p0)."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    rot = _frame_along(p1 - p0) if frame is None else np.asarray(frame, dtype=np.float64)
    return Primitive(
        kind=Primitive.CAPSULE,
        p0=p0,
        p1=p1,
        radius=float(radius),
        rot=rot,
        radii=np.full(3, float(radius)),
        part=part,
        material=material,
    )


def ellipsoid(
    center: np.ndarray, rot: np.ndarray, radii: np.ndarray, part: int, material: Material
) -> Primitive:
    """An ellipsoid with centre (3,), axes = columns of rot (3, 3) and semi-axes radii (3,)."""
    c = np.asarray(center, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    return Primitive(
        kind=Primitive.ELLIPSOID,
        p0=c,
        p1=c.copy(),
        radius=float(radii.max()),
        rot=np.asarray(rot, dtype=np.float64),
        radii=radii,
        part=part,
        material=material,
    )
