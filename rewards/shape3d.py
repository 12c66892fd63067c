"""Rewards for point clouds in the shape modality's sample layout `{"points": (B, N, 3), "mask": (B, N)}`.

World units, +z up, gravity along −z; padded points (mask 0) never count. All but `Stability` are
differentiable in the points.

- `ChamferToTarget`: −chamfer distance to a target cloud (a primitive named by a prompt, or a PLY/OBJ
  file), optionally minimised over turns of the target about the vertical axis.
- `MirrorSymmetry`: −chamfer distance between a cloud and its mirror image in the best of `planes`
  vertical planes through its centroid, divided by the cloud's mean squared radius (scale-free).
- `SurfaceUniformity`: −coefficient of variation (std / mean) of the nearest-neighbour distances.
- `SizeTarget`: −Σ log²(measured / target) of height, horizontal diameter and/or their ratio.
- `Stability`: does the centre of mass stand over the support polygon (not differentiable).
- `ViewClassFidelity`: probability the shipped view classifier gives the prompted primitive, per
  rendered view (asks `decode` for the views, or renders them itself from points; one score per view,
  reduced by the mean).

Every one declares `PointCloudReader` (`modalities/shape3d/io.py`), so `diffalign score shapes/ -r
stability,mirror_symmetry` scores a folder of .ply/.obj files, one row per file (short names in
`rewards/scoring.py`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond

#: the reader `diffalign score` uses for these rewards' layout (a folder of .ply/.obj files)
POINT_CLOUD_READER = "diffalign.modalities.shape3d.io.PointCloudReader"


class ShapeReward(Reward):
    """Base of the rewards on the shape layout; declares the point-cloud reader of `diffalign score`."""

    reader = POINT_CLOUD_READER


def _layout(samples: Any, who: str) -> tuple[Tensor, Tensor]:
    """(points (B, N, 3), mask (B, N)) of the sample layout, checked."""
    if not isinstance(samples, Mapping) or "points" not in samples:
        got = sorted(samples) if isinstance(samples, Mapping) else type(samples).__name__
        raise ValueError(f"{who} expects the shape layout {{'points': (B, N, 3), 'mask': (B, N)}}, got {got}")
    points = samples["points"]
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{who}: 'points' must be (B, N, 3), got {tuple(points.shape)}")
    mask = samples.get("mask")
    mask = torch.ones(points.shape[:2], device=points.device) if mask is None else mask.to(points)
    if (mask.sum(1) < 2).any():
        raise ValueError(f"{who}: every cloud needs at least 2 real points")
    return points.float(), mask.float()


def centroid(points: Tensor, mask: Tensor) -> Tensor:
    """(B, 3) mean of the real points."""
    return (points * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def mean_sq_radius(points: Tensor, mask: Tensor) -> Tensor:
    """(B,) mean squared distance of the real points to their centroid."""
    d = ((points - centroid(points, mask)[:, None]) ** 2).sum(-1)
    return (d * mask).sum(1) / mask.sum(1).clamp_min(1)


def yaw(points: Tensor, angle: float) -> Tensor:
    """Points turned by `angle` radians about the vertical (z) axis."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=points.dtype, device=points.device)
    return points @ rot.T


# ---------------------------------------------------------------------------------------------------
class ChamferToTarget(ShapeReward):
    """−chamfer(sample, target): squared distances, both directions (`geometry.chamfer_distance`).

    The target is `target`, a PLY/OBJ path (its points, `io.read_point_cloud`) or a condition ("a tall
    cylinder": that primitive upright, unturned, medium-sized unless the condition says otherwise, with
    `target_points` surface points); with `target: null` each row's own prompt gives its target.
    `yaw_steps` > 1 scores against the best of that many turns of the target about +z (evenly spaced
    over 360°), so a sample is not punished for facing another way.

    Args:
        target: a path, a condition, or None (per-row prompt targets).
        target_points: points of a primitive target.
        yaw_steps: turns of the target tried.
        backend: geometry backend ("auto", "torch", "pytorch3d").
    """

    differentiable = True

    def __init__(
        self, target: Any = None, target_points: int = 256, yaw_steps: int = 1, backend: str = "auto"
    ) -> None:
        super().__init__("chamfer_to_target")
        if yaw_steps < 1:
            raise ValueError(f"yaw_steps must be >= 1, got {yaw_steps}")
        self.target, self.target_points, self.yaw_steps, self.backend = (
            target,
            target_points,
            yaw_steps,
            backend,
        )
        self._fixed = None if target is None else self._load(target)
        self._cache: dict[str, Tensor] = {}

    def _load(self, target: Any) -> Tensor:
        import os

        if isinstance(target, (str, os.PathLike)) and str(target).lower().endswith((".ply", ".obj")):
            from diffalign.modalities.shape3d.io import read_point_cloud

            return read_point_cloud(target, max_points=None)[:, :3]
        return primitive_target(target, self.target_points)

    def _targets(self, cond: Cond, b: int) -> tuple[Tensor, Tensor]:
        if self._fixed is not None:
            t = self._fixed[None].expand(b, -1, -1)
            return t, torch.ones(t.shape[:2])
        prompts = cond.get("prompt")
        if prompts is None:
            raise ValueError("ChamferToTarget with target: null reads each row's target from cond['prompt']")
        clouds = []
        for p in prompts:
            key = repr(p)
            if key not in self._cache:
                self._cache[key] = primitive_target(p, self.target_points)
            clouds.append(self._cache[key])
        from diffalign.core.functional import pad_stack

        t, m = pad_stack(clouds, 0)
        return t, m.reshape(t.shape[:2])

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        from diffalign.modalities.shape3d.geometry import chamfer_distance

        points, mask = _layout(samples, self.name)
        target, tmask = self._targets(cond, points.shape[0])
        target, tmask = target.to(points), tmask.to(points)
        dists = torch.stack(
            [
                chamfer_distance(
                    points, yaw(target, 2 * math.pi * k / self.yaw_steps), mask, tmask, backend=self.backend
                )
                for k in range(self.yaw_steps)
            ]
        )
        return RewardOutput(scores=-dists.min(0).values)


def primitive_target(condition: Any, num_points: int = 256, seed: int = 0) -> Tensor:
    """The surface points (num_points, 3) of the primitive a condition names: upright, unturned, at its
    aspect and size ("regular" and "medium" when unspecified), centred; seeded."""
    from diffalign.modalities.shape3d.conditioning import parse_condition
    from diffalign.modalities.shape3d.primitives import ShapeSpec, make_shape

    c = parse_condition(condition)
    if c.shape is None:
        raise ValueError(f"target condition {condition!r} names no shape")
    spec = ShapeSpec(c.shape, c.aspect or "regular", c.size or "medium", depth=0.8)
    points, _ = make_shape(spec, num_points, np.random.default_rng(seed))
    return torch.from_numpy(points)


# ---------------------------------------------------------------------------------------------------
def reflect(points: Tensor, center: Tensor, angle: float) -> Tensor:
    """Mirror points (B, N, 3) in the vertical plane through `center` (B, 3) whose normal is at `angle`
    radians from +x in the horizontal plane."""
    n = torch.tensor([math.cos(angle), math.sin(angle), 0.0], dtype=points.dtype, device=points.device)
    d = ((points - center[:, None]) * n).sum(-1, keepdim=True)
    return points - 2 * d * n


class MirrorSymmetry(ShapeReward):
    """−min over `planes` vertical mirror planes through the centroid (normals at kπ/planes) of
    chamfer(cloud, mirrored cloud) / mean squared radius. 0 for a cloud symmetric in one of the planes;
    unchanged by scaling the cloud.

    Args:
        planes: plane orientations tried, evenly spaced over 180°.
        backend: geometry backend.
    """

    differentiable = True

    def __init__(self, planes: int = 12, backend: str = "auto") -> None:
        super().__init__("mirror_symmetry")
        if planes < 1:
            raise ValueError(f"planes must be >= 1, got {planes}")
        self.planes, self.backend = planes, backend

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        from diffalign.modalities.shape3d.geometry import chamfer_distance

        points, mask = _layout(samples, self.name)
        c = centroid(points, mask)
        dists = torch.stack(
            [
                chamfer_distance(
                    points, reflect(points, c, math.pi * k / self.planes), mask, mask, backend=self.backend
                )
                for k in range(self.planes)
            ]
        )
        best = dists.min(0)
        return RewardOutput(
            scores=-best.values / mean_sq_radius(points, mask).clamp_min(1e-8),
            info={"best_plane_deg": (180.0 * best.indices.float() / self.planes).detach()},
        )


# ---------------------------------------------------------------------------------------------------
class SurfaceUniformity(ShapeReward):
    """−std / mean of each real point's distance to its nearest other point: 0 when every point has its
    neighbour at the same distance (an even sampling), larger for clumps and gaps. Scale-free.

    Args:
        backend: geometry backend.
    """

    differentiable = True

    def __init__(self, backend: str = "auto") -> None:
        super().__init__("surface_uniformity")
        self.backend = backend

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        from diffalign.modalities.shape3d.geometry import knn

        points, mask = _layout(samples, self.name)
        d2, _ = knn(points, 1, mask, backend=self.backend)
        d = d2[..., 0].clamp_min(1e-12).sqrt()
        n = mask.sum(1).clamp_min(1)
        mean = (d * mask).sum(1) / n
        std = ((((d - mean[:, None]) ** 2) * mask).sum(1) / n).clamp_min(1e-12).sqrt()
        return RewardOutput(scores=-std / mean.clamp_min(1e-8), info={"nn_distance": mean.detach()})


# ---------------------------------------------------------------------------------------------------
def height_and_width(points: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) height (z extent of the real points) and horizontal diameter (twice the largest horizontal
    distance of a real point from the centroid's vertical axis)."""
    big = torch.finfo(points.dtype).max
    z = points[..., 2]
    top = torch.where(mask > 0, z, torch.full_like(z, -big)).max(1).values
    bottom = torch.where(mask > 0, z, torch.full_like(z, big)).min(1).values
    c = centroid(points, mask)
    r = ((points[..., :2] - c[:, None, :2]) ** 2).sum(-1).clamp_min(1e-12).sqrt()
    width = 2 * torch.where(mask > 0, r, torch.zeros_like(r)).max(1).values
    return top - bottom, width


class SizeTarget(ShapeReward):
    """−Σ log²(measured / target) over the targets given: `height` (z extent), `width` (horizontal
    diameter, `height_and_width`) and `aspect` (height / width). 0 when all are met.

    Args:
        height, width, aspect: the targets (world units; aspect a ratio); at least one.
    """

    differentiable = True

    def __init__(
        self, height: float | None = None, width: float | None = None, aspect: float | None = None
    ) -> None:
        super().__init__("size_target")
        targets = {"height": height, "width": width, "aspect": aspect}
        if all(v is None for v in targets.values()):
            raise ValueError("SizeTarget needs at least one of height, width, aspect")
        bad = {k: v for k, v in targets.items() if v is not None and v <= 0}
        if bad:
            raise ValueError(f"SizeTarget targets must be positive, got {bad}")
        self.targets = {k: float(v) for k, v in targets.items() if v is not None}

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        points, mask = _layout(samples, self.name)
        h, w = height_and_width(points, mask)
        measured = {"height": h, "width": w, "aspect": h / w.clamp_min(1e-8)}
        err = sum(torch.log(measured[k].clamp_min(1e-8) / v) ** 2 for k, v in self.targets.items())
        return RewardOutput(scores=-err, info={k: v.detach() for k, v in measured.items()})


# ---------------------------------------------------------------------------------------------------
def convex_hull_2d(points: np.ndarray) -> np.ndarray:
    """Vertices (k, 2) of the convex hull of 2-D points, counter-clockwise (Andrew's monotone chain);
    fewer than 3 vertices for collinear or repeated points."""
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    if len(pts) <= 2:
        return pts

    def cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))

    lower: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[np.ndarray] = []
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def support_margin(point: np.ndarray, hull: np.ndarray) -> float:
    """Signed distance from a 2-D point to a convex polygon's boundary: positive inside, negative outside
    (a polygon of 1 or 2 vertices has no inside)."""
    if len(hull) == 1:
        return -float(np.linalg.norm(point - hull[0]))
    edges = [(hull[i], hull[(i + 1) % len(hull)]) for i in range(len(hull))]
    dist = min(_segment_distance(point, a, b) for a, b in edges)
    if len(hull) < 3:
        return -dist
    inside = all((b[0] - a[0]) * (point[1] - a[1]) - (b[1] - a[1]) * (point[0] - a[0]) >= 0 for a, b in edges)
    return dist if inside else -dist


class Stability(ShapeReward):
    """Static stability on a horizontal floor: is the centre of mass over the support polygon?

    The support is the set of real points within `tolerance` × height of the lowest one; the support
    polygon is the convex hull of their horizontal positions; the centre of mass is the mean of the real
    points (a uniform shell). The margin is the signed horizontal distance from the centre of mass to the
    polygon's edge (positive inside), divided by the cloud's horizontal radius of gyration. Score:
    clip(margin / margin_cap, −1, 1): +1 for a clear margin, below 0 when the shape would tip over.
    `info["stable"]` is 1 where the margin is positive. Not differentiable.

    Args:
        tolerance: height share of the support layer.
        margin_cap: the normalised margin that earns the full score.
    """

    def __init__(self, tolerance: float = 0.05, margin_cap: float = 0.1) -> None:
        super().__init__("stability")
        if tolerance <= 0 or margin_cap <= 0:
            raise ValueError(f"tolerance and margin_cap must be positive, got {tolerance}, {margin_cap}")
        self.tolerance, self.margin_cap = tolerance, margin_cap

    def margin(self, points: np.ndarray) -> float:
        """The normalised margin of one cloud (n, 3) of real points."""
        z = points[:, 2]
        height = max(float(z.max() - z.min()), 1e-6)
        support = points[z <= z.min() + self.tolerance * height, :2]
        com = points[:, :2].mean(axis=0)
        gyration = math.sqrt(max(float(((points[:, :2] - com) ** 2).sum(1).mean()), 1e-12))
        return support_margin(com, convex_hull_2d(support)) / gyration

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        points, mask = _layout(samples, self.name)
        p, m = points.detach().cpu().double().numpy(), mask.detach().cpu().numpy() > 0
        margins = torch.tensor([self.margin(p[i][m[i]]) for i in range(len(p))], dtype=torch.float32)
        scores = (margins / self.margin_cap).clamp(-1, 1).to(points.device)
        return RewardOutput(scores=scores, info={"stable": (margins > 0).float(), "margin": margins})


# ---------------------------------------------------------------------------------------------------
class ViewClassFidelity(ShapeReward):
    """Probability the shipped view classifier (`view_classifier.py`) gives the primitive each row's
    prompt names, in every view `decode` renders for it (`request = {"views": views}`; samples without
    `images`, such as files being scored, are rendered here from their points, `views_of`). Scores are per
    view (B, V), reduced by their mean; `info["class_accuracy"]` is 1 where the views' mean
    log-probabilities pick the prompted primitive. Differentiable through the renderer.

    Args:
        views: the cameras asked for (`render.parse_views`: "orbit", "quad", a list, {"random": n}).
        weights: classifier weights (default the shipped `view_classifier.safetensors`).
        log_prob: score with log-probabilities instead.
    """

    differentiable = True
    reduction = "mean"

    def __init__(self, views: Any = "orbit", weights: str | None = None, log_prob: bool = False) -> None:
        super().__init__("view_class_fidelity", request={"views": views})
        from diffalign.modalities.shape3d.view_classifier import CLASSIFIER_WEIGHTS, load_view_classifier

        self.classifier = load_view_classifier(weights or CLASSIFIER_WEIGHTS)
        self.log_prob = log_prob

    def views_of(self, samples: Any) -> Tensor:
        """The rendered views (B, V, C, H, W) of the samples: the decoded `images` when the backbone
        rendered them, else rendered here from `points` (files being scored have no backbone) with the
        renderer's defaults (32 px, σ = 1, what `ShapeBackbone.decode` uses) and the cameras of
        `request["views"]`; random views then come from a generator seeded 0, the same for every call."""
        if isinstance(samples, Mapping) and "images" in samples:
            return samples["images"]
        from diffalign.modalities.shape3d.render import parse_views, render_points

        points, mask = _layout(samples, self.name)
        cameras = parse_views(self.request["views"], torch.Generator().manual_seed(0))
        return render_points(points, mask, cameras, colors=samples.get("colors"))

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        from diffalign.modalities.shape3d.conditioning import prompted_shapes

        images = self.views_of(samples)  # (B, V, C, H, W)
        b, v = images.shape[:2]
        shape = prompted_shapes(cond.get("prompt"), b, self.name).to(images.device)
        self.classifier.to(images.device)
        logp = self.classifier(images.flatten(0, 1)).log_softmax(-1).reshape(b, v, -1)
        chosen = logp.gather(2, shape[:, None, None].expand(b, v, 1))[..., 0]
        scores = chosen if self.log_prob else chosen.exp()
        correct = (logp.mean(1).argmax(-1) == shape).float().detach()
        return RewardOutput(scores=scores, info={"class_accuracy": correct})
