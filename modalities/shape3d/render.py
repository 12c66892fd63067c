"""A differentiable soft point-splatting renderer: point clouds to small images from given cameras.

Cameras are orthographic, looking at the origin from a direction given by `azimuth` (degrees about +z,
0 = from +x) and `elevation` (degrees above the horizontal), with `extent` world units from the image
centre to its edge (`Camera`). The camera frame: u (image right), v (image up), depth (away from the
camera); world +z projects upwards.

Each real point i splats an isotropic Gaussian of `sigma` pixels at its projection (u_i, v_i). For a
pixel p the splat density is D(p) = Σ_i g_i(p) and

- coverage  α(p) = 1 − exp(−κ·D(p))                         (κ = `density`; a soft silhouette),
- soft depth d(p) = Σ_i g_i(p)·e_i·z_i / Σ_i g_i(p)·e_i,  e_i = exp(−(z_i − z_min)/τ)   (nearest points win),
- shade     s(p) = 1 − 0.6·clip((d(p) − z_min)/(z_max − z_min), 0, 1), with z_min, z_max the depth
  range of the cloud in that view (near surfaces bright, far ones dim: the 3-D cue of a flat image),
- image     I(p) = α(p)·s(p) on black, times the soft-depth-weighted colour of the points when the
  cloud has colours.

Because a Gaussian splat factorises over the two image axes, every sum above is one einsum of
(B, V, N, H) by (B, V, N, W) factors: memory O(B·V·N·(H + W)), never O(B·V·N·H·W), and exact
gradients reach every point through its projection and depth.

With pytorch3d installed, `render_points(..., backend="pytorch3d")` (or "auto") sums the same splats
over the `points_per_pixel` nearest points pytorch3d's point rasteriser finds within 3σ of each pixel;
the two agree up to those truncated tails (a test checks it where pytorch3d exists).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.modalities.shape3d.geometry import Backend, _lengths, _use_pytorch3d


@dataclass(frozen=True)
class Camera:
    """An orthographic camera looking at the origin (see the module docstring)."""

    azimuth: float = 30.0
    elevation: float = 35.0
    extent: float = 1.1

    def rotation(self) -> Tensor:
        """(3, 3) world → camera rotation; rows are the camera's u (right), v (up) and depth axes."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        toward_camera = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        forward = -toward_camera
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        if right.norm() < 1e-6:  # looking straight down or up: image right is world +y
            right = torch.tensor([0.0, 1.0, 0.0])
        right = right / right.norm()
        up = torch.linalg.cross(right, forward)
        return torch.stack([right, up, forward])


#: named camera sets a reward can ask for (`{"views": "quad"}`)
VIEW_SETS: dict[str, tuple[Camera, ...]] = {
    "front": (Camera(30.0, 35.0),),
    "pair": (Camera(30.0, 35.0), Camera(120.0, 35.0)),
    "quad": tuple(Camera(a, 35.0) for a in (30.0, 120.0, 210.0, 300.0)),
    # four turns, alternately low and high (a box's corners and a cylinder's round top both show)
    "orbit": tuple(Camera(a, e) for a, e in ((30.0, 25.0), (120.0, 65.0), (210.0, 25.0), (300.0, 65.0))),
    "six": tuple(Camera(a, 35.0) for a in range(0, 360, 60)),
    "top": (Camera(0.0, 90.0),),
}


def parse_views(spec: Any, generator: torch.Generator | None = None) -> list[Camera]:
    """Cameras from a request's `views` entry:

    - a name of `VIEW_SETS` ("front", "pair", "quad", "orbit", "six", "top");
    - a list of cameras or dicts `{"azimuth": deg, "elevation": deg, "extent": units}`;
    - `{"random": n, "elevation": [lo, hi]}`: n cameras at uniform azimuths and elevations in
      [lo, hi] (default [15, 50]) drawn from `generator` (the same cameras for every row of a batch).
    """
    if isinstance(spec, str):
        if spec not in VIEW_SETS:
            raise ValueError(f"unknown view set {spec!r}; known: {', '.join(VIEW_SETS)}")
        return list(VIEW_SETS[spec])
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"random", "elevation", "extent"}
        if "random" not in spec or unknown:
            raise ValueError(
                f"a views dict is {{'random': n, 'elevation': [lo, hi], 'extent': e}}, got {dict(spec)}"
            )
        n = int(spec["random"])
        if n < 1:
            raise ValueError(f"views random needs n >= 1, got {n}")
        lo, hi = spec.get("elevation", (15.0, 50.0))
        u = torch.rand((n, 2), generator=generator)
        extent = float(spec.get("extent", Camera.extent))
        return [Camera(float(360 * a), float(lo + (hi - lo) * e), extent) for a, e in u.tolist()]
    if isinstance(spec, Sequence) and spec:
        cams = []
        for c in spec:
            if isinstance(c, Camera):
                cams.append(c)
            elif isinstance(c, Mapping) and set(c) <= {"azimuth", "elevation", "extent"}:
                cams.append(Camera(**{k: float(v) for k, v in c.items()}))
            else:
                raise ValueError(f"a camera is a dict with azimuth, elevation, extent; got {c!r}")
        return cams
    raise ValueError(f"views must be a view-set name, a list of cameras or {{'random': n}}, got {spec!r}")


def project(points: Tensor, cameras: Sequence[Camera] | Sequence[Sequence[Camera]]) -> Tensor:
    """(B, V, N, 3) camera coordinates (u, v, depth) of points (B, N, 3) in each camera, divided by the
    camera's extent (so the image spans u, v in [−1, 1]). `cameras`: V cameras shared by every row, or
    B lists of V cameras (one list per row)."""
    per_row = len(cameras) > 0 and isinstance(cameras[0], (list, tuple))
    rows = cameras if per_row else [cameras]
    if per_row and len(rows) != points.shape[0]:
        raise ValueError(f"got camera lists for {len(rows)} rows and {points.shape[0]} clouds")
    rot = torch.stack([torch.stack([c.rotation() for c in r]) for r in rows]).to(points)  # (B|1, V, 3, 3)
    ext = torch.tensor([[c.extent for c in r] for r in rows], dtype=points.dtype, device=points.device)
    return (
        torch.einsum("bvij,bnj->bvni", rot.expand(points.shape[0], -1, -1, -1), points[..., :3])
        / ext[..., None, None]
    )


def pixel_centres(size: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(size,) pixel-centre coordinates in [−1, 1], left to right (rows: the same, top to bottom flipped)."""
    return -1 + (2 * torch.arange(size, device=device, dtype=dtype) + 1) / size


def _compose(
    density: Tensor,
    depth_num: Tensor,
    weight: Tensor,
    color_num: Tensor | None,
    kappa: float,
    z_range: Tensor,
) -> Tensor:
    """Coverage × depth shade (× colour) from the splat sums; depths are relative to z_min (B, V)."""
    alpha = 1 - torch.exp(-kappa * density)  # (B, V, H, W)
    depth = depth_num / (weight + 1e-8)
    shade = 1 - 0.6 * (depth / z_range[..., None, None]).clamp(0, 1)
    img = (alpha * shade)[:, :, None]  # (B, V, 1, H, W)
    if color_num is not None:
        img = img * (color_num / (weight[:, :, None] + 1e-8)).clamp(0, 1)
    return img


def render_points(
    points: Tensor,
    mask: Tensor | None = None,
    cameras: Sequence[Camera] | Sequence[Sequence[Camera]] | str = "front",
    image_size: int = 32,
    sigma: float = 1.0,
    density: float = 2.0,
    depth_temperature: float = 0.1,
    colors: Tensor | None = None,
    backend: Backend = "torch",
) -> Tensor:
    """Images (B, V, C, H, W) of point clouds (B, N, 3) from V cameras, C = 1 (shaded gray) or 3 (with
    `colors` (B, N, 3) in [0, 1]); see the module docstring for the formula. Differentiable.

    Args:
        mask: (B, N) real points (padded points draw nothing).
        cameras: V cameras, a `VIEW_SETS` name, or B lists of V cameras (each row its own).
        image_size: H = W in pixels.
        sigma: splat standard deviation in pixels.
        density: κ, how fast overlapping splats saturate coverage.
        depth_temperature: τ of the soft depth test, in units of the extent.
        backend: "torch" (default, the tested path), "pytorch3d" or "auto" (pytorch3d when installed).
    """
    cams = parse_views(cameras) if isinstance(cameras, str) else list(cameras)
    if points.dim() != 3 or points.shape[-1] < 3:
        raise ValueError(f"render_points expects points (B, N, 3), got {tuple(points.shape)}")
    b, n = points.shape[:2]
    m = torch.ones((b, n), dtype=points.dtype, device=points.device) if mask is None else mask.to(points)
    cam = project(points.float() * m[..., None], cams)  # (B, V, N, 3); padded points at the origin
    u, v, z = cam[..., 0], cam[..., 1], cam[..., 2]
    big = torch.finfo(z.dtype).max
    z_min = torch.where(m[:, None] > 0, z, torch.full_like(z, big)).min(dim=2, keepdim=True).values.detach()
    z_max = torch.where(m[:, None] > 0, z, torch.full_like(z, -big)).max(dim=2).values.detach()
    z_range = (z_max - z_min[..., 0]).clamp_min(1e-3)  # (B, V)
    z = torch.where(m[:, None] > 0, z - z_min, torch.zeros_like(z))  # depth behind the nearest real point
    e = torch.exp(-z / depth_temperature) * m[:, None]  # (B, V, N)
    if _use_pytorch3d(backend, mask):
        return _render_pytorch3d(u, v, z, e, z_range, image_size, sigma, density, colors, mask)
    s = 2 * sigma / image_size  # σ in image units ([−1, 1] across)
    grid = pixel_centres(image_size, points.device)
    gx = torch.exp(-((u[..., None] - grid) ** 2) / (2 * s * s))  # (B, V, N, W)
    gy = torch.exp(-((v[..., None] - grid.flip(0)) ** 2) / (2 * s * s))  # (B, V, N, H), row 0 = top
    mgy = gy * m[:, None, :, None]
    dens = torch.einsum("bvnh,bvnw->bvhw", mgy, gx)
    weight = torch.einsum("bvnh,bvnw->bvhw", gy * e[..., None], gx)
    depth_num = torch.einsum("bvnh,bvnw->bvhw", gy * (e * z)[..., None], gx)
    color_num = None
    if colors is not None:
        color_num = torch.einsum("bvnh,bvnw,bnc->bvchw", gy * e[..., None], gx, colors.float())
    return _compose(dens, depth_num, weight, color_num, density, z_range)


def _render_pytorch3d(
    u: Tensor,
    v: Tensor,
    z: Tensor,
    e: Tensor,
    z_range: Tensor,
    image_size: int,
    sigma: float,
    kappa: float,
    colors: Tensor | None,
    mask: Tensor | None,
    points_per_pixel: int = 32,
) -> Tensor:
    """The splat sums of `render_points` over the nearest points pytorch3d's rasteriser finds per pixel
    (within 3σ; `points_per_pixel` of them at most)."""
    from pytorch3d.renderer.points.rasterize_points import rasterize_points
    from pytorch3d.structures import Pointclouds

    b, nv, n = u.shape
    counts = _lengths(mask, u[:, 0]).repeat_interleave(nv).tolist()
    # pytorch3d's NDC has +x to the left and +y up (ours: u to the right); its points need z > 0
    ndc = torch.stack([-u, v, z + 1.0], dim=-1).reshape(b * nv, n, 3)
    clouds = Pointclouds([ndc[i, : counts[i]] for i in range(b * nv)])
    s = 2 * sigma / image_size
    idx, _, dists = rasterize_points(
        clouds, image_size=image_size, radius=3 * s, points_per_pixel=points_per_pixel
    )
    valid = idx >= 0  # (BV, H, W, K) indices into the packed (concatenated) points
    packed = idx.clamp_min(0).long()

    def flat(x: Tensor) -> Tensor:  # (BV, N, ...) -> packed (P, ...)
        return torch.cat([x[i, : counts[i]] for i in range(b * nv)])

    g = torch.where(valid, torch.exp(-dists / (2 * s * s)), torch.zeros_like(dists))
    w = g * flat(e.reshape(b * nv, n))[packed]
    shape = (b, nv, image_size, image_size)
    dens = g.sum(-1).reshape(shape)
    weight = w.sum(-1).reshape(shape)
    depth_num = (w * flat(z.reshape(b * nv, n))[packed]).sum(-1).reshape(shape)
    color_num = None
    if colors is not None:
        col = flat(colors.float()[:, None].expand(b, nv, n, 3).reshape(b * nv, n, 3))
        color_num = (
            (w[..., None] * col[packed]).sum(-2).permute(0, 3, 1, 2).reshape(b, nv, 3, image_size, image_size)
        )
    return _compose(dens, depth_num, weight, color_num, kappa, z_range)
