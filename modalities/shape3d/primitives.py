"""Primitive shapes built with trimesh and sampled on their surface: the modality's embedded data.

`make_shape(spec, rng)` builds one primitive mesh (box, sphere, cylinder, cone, torus, capsule), stretches
it to its aspect, scales it to its size, turns it about the vertical axis (and, for some shapes, tilts
it), samples `num_points` points uniformly by area on its surface (`trimesh.sample.sample_surface`) and
centres them on their mean. Coordinates are world units with +z up (gravity along −z): a medium
"regular" primitive is about 1 unit across; the largest fit in a ball of radius ~1.3.

`random_spec(rng, ...)` draws the attributes: shape, aspect (flat / regular / tall), size (small / medium
/ large), a yaw in [0, 2π), and with probability `tilt_probability` a tilt of 20°–70° about a random
horizontal axis (a tilted box or cylinder rests on an edge: the stability reward's room to improve).
Everything is drawn from one numpy `Generator`, so a seed gives the same shapes on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from diffalign.modalities.shape3d.conditioning import ASPECTS, COLOR_RGB, COLORS, SHAPES, SIZES

#: height / width ratio per aspect ("regular" is the unnamed middle value): heights grow by its square
#: root, widths shrink by it (a torus keeps its width)
ASPECT_FACTORS: dict[str, float] = {"flat": 0.5, "regular": 1.0, "tall": 2.0}
#: overall scale per size ("medium" is the unnamed middle value)
SIZE_FACTORS: dict[str, float] = {"small": 0.65, "medium": 0.9, "large": 1.15}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one sampled shape (the generator's draw)."""

    shape: str
    aspect: str = "regular"
    size: str = "medium"
    yaw: float = 0.0
    tilt: float = 0.0  # radians about `tilt_axis` (a horizontal direction angle)
    tilt_axis: float = 0.0
    stretch: float = 1.0  # jitter of the aspect factor
    scale: float = 1.0  # jitter of the size factor
    depth: float = 1.0  # a box's depth / width
    color: str | None = None

    @property
    def tilted(self) -> bool:
        return self.tilt != 0.0


def base_mesh(shape: str, depth: float = 1.0):
    """The primitive at aspect 1 and size 1 (about one unit across and tall), centred near the origin.
    Meshes other than the box (whose depth varies) are built once per process; do not modify them."""
    if shape == "box":
        import trimesh

        return trimesh.creation.box(extents=(1.0, depth, 1.0))
    return _round_mesh(shape)


@cache
def _round_mesh(shape: str):
    import trimesh

    c = trimesh.creation
    if shape == "sphere":
        return c.icosphere(subdivisions=3, radius=0.5)
    if shape == "cylinder":
        return c.cylinder(radius=0.45, height=1.0, sections=48)
    if shape == "cone":
        return c.cone(radius=0.5, height=1.0, sections=48)
    if shape == "torus":
        return c.torus(major_radius=0.38, minor_radius=0.14, major_sections=48, minor_sections=16)
    if shape == "capsule":
        return c.capsule(height=0.6, radius=0.3, count=(24, 24))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3×3 rotation matrix about a unit `axis` (Rodrigues)."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def shape_transform(spec: ShapeSpec) -> np.ndarray:
    """The 3×3 linear map from the base primitive to the spec's shape (stretch, scale, yaw, tilt)."""
    a = ASPECT_FACTORS[spec.aspect] * spec.stretch
    s = SIZE_FACTORS[spec.size] * spec.scale
    # the torus keeps its width (a narrower ring would close its hole): its aspect stretches the tube
    wide = s if spec.shape == "torus" else s / math.sqrt(a)
    stretch = np.diag([wide, wide, s * math.sqrt(a)])
    m = _rotation(np.array([0.0, 0.0, 1.0]), spec.yaw) @ stretch
    if spec.tilt:
        axis = np.array([math.cos(spec.tilt_axis), math.sin(spec.tilt_axis), 0.0])
        m = _rotation(axis, spec.tilt) @ m
    return m


def make_shape(
    spec: ShapeSpec, num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Surface samples (num_points, 3) float32 of a spec, centred on their mean, and per-point colours
    (num_points, 3) in [0, 1] when the spec has a colour (else None)."""
    from trimesh.sample import sample_surface

    mesh = base_mesh(spec.shape, spec.depth)
    points, _ = sample_surface(mesh, int(num_points), seed=rng)
    points = np.asarray(points, dtype=np.float64) @ shape_transform(spec).T
    points = (points - points.mean(axis=0, keepdims=True)).astype(np.float32)
    colors = None
    if spec.color is not None:
        base = np.asarray(COLOR_RGB[spec.color], dtype=np.float32)
        colors = np.clip(base + rng.normal(0.0, 0.04, size=(num_points, 3)), 0, 1).astype(np.float32)
    return points, colors


def random_spec(
    rng: np.random.Generator,
    shape: str | None = None,
    tilt_probability: float = 0.3,
    colors: bool = False,
) -> ShapeSpec:
    """A random primitive: uniform shape (unless given), aspect and size; jittered; yawed; sometimes
    tilted. The sphere and the torus are never tilted (a tilt of a sphere is invisible; a tilted torus
    stands on its rim)."""
    shape = shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))]
    aspect = ("flat", "regular", "tall")[int(rng.integers(3))]
    size = ("small", "medium", "large")[int(rng.integers(3))]
    yaw = float(rng.uniform(0, 2 * math.pi))
    stretch = float(rng.uniform(0.85, 1.15))
    scale = float(rng.uniform(0.9, 1.1))
    depth = float(rng.uniform(0.6, 1.0))
    tilt, tilt_axis = 0.0, 0.0
    tilt_draw, axis_draw, angle_draw = rng.uniform(), rng.uniform(0, 2 * math.pi), rng.uniform(20, 70)
    if shape not in ("sphere", "torus") and tilt_draw < tilt_probability:
        tilt, tilt_axis = math.radians(float(angle_draw)), float(axis_draw)
    color = COLORS[int(rng.integers(len(COLORS)))] if colors else None
    return ShapeSpec(shape, aspect, size, yaw, tilt, tilt_axis, stretch, scale, depth, color)


def aspect_word(spec: ShapeSpec) -> str | None:
    """The prompt word of a spec's aspect (None for "regular")."""
    return spec.aspect if spec.aspect in ASPECTS else None


def size_word(spec: ShapeSpec) -> str | None:
    """The prompt word of a spec's size (None for "medium")."""
    return spec.size if spec.size in SIZES else None
