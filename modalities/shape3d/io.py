"""Point-cloud files: PLY and OBJ through trimesh, for `diffalign sample` outputs and for scoring files.

- `write_point_cloud(path, points, colors)`: one cloud as .ply (binary, with RGB when given) or .obj
  (vertices only);
- `read_point_cloud(path, max_points)`: the points (n, 3) — or (n, 6) with colours in [0, 1] — of a
  .ply/.obj file. A file with faces (a mesh) is sampled on its surface (`max_points` points, area-uniform,
  seeded); a point cloud with more than `max_points` points is subsampled (seeded), so any file fits
  a model's `max_points`;
- `write_samples(samples, folder)`: every row of a decoded batch as `{index:05d}.ply`;
- `iter_point_clouds(source)`: the reader behind scoring a folder: `(id, cloud or error message)` for
  every .ply/.obj file of a folder (sorted by name) or of a list of paths; an unreadable file yields its
  error instead of stopping the iteration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SUFFIXES = (".ply", ".obj")


def write_point_cloud(path: str | os.PathLike[str], points: Any, colors: Any = None) -> Path:
    """Write one cloud (n, 3) (colours (n, 3) in [0, 1] optional) as PLY or OBJ (by the suffix)."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: point clouds are written as {' or '.join(SUFFIXES)}")
    pts = np.asarray(torch.as_tensor(points).detach().cpu().float(), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{path}: points must be (n, 3), got {pts.shape}")
    rgba = None
    if colors is not None:
        c = np.asarray(torch.as_tensor(colors).detach().cpu().float()).clip(0, 1)
        rgba = np.concatenate([np.round(c * 255), np.full((len(c), 1), 255)], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.PointCloud(pts, colors=rgba).export(str(path))
    return path


def read_point_cloud(path: str | os.PathLike[str], max_points: int | None = 96, seed: int = 0) -> Tensor:
    """The points of a .ply / .obj file as float (n, 3), or (n, 6) with colours in [0, 1] when the file
    has per-point colours. Meshes are sampled on their surface (`max_points` points); larger clouds are
    subsampled to `max_points` (both seeded). Raises ValueError naming the file when it holds no points."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: not a point-cloud file (expected {' or '.join(SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"point-cloud file not found: {path}")
    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as e:  # noqa: BLE001 - trimesh raises many kinds of errors on broken files
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if isinstance(loaded, trimesh.Scene):
        geoms = list(loaded.geometry.values())
        if not geoms:
            raise ValueError(f"{path}: the file holds no geometry")
        loaded = trimesh.util.concatenate(geoms) if len(geoms) > 1 else geoms[0]
    rng = np.random.default_rng(seed)
    colors = None
    if isinstance(loaded, trimesh.Trimesh) and len(loaded.faces):
        n = max_points or 96
        pts, _ = trimesh.sample.sample_surface(loaded, n, seed=rng)
    else:
        pts = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))))
        raw = getattr(loaded, "colors", None)
        if raw is None and hasattr(loaded, "visual"):
            raw = getattr(loaded.visual, "vertex_colors", None)
        if raw is not None and len(raw) == len(pts) and _has_colour(raw):
            colors = np.asarray(raw)[:, :3] / 255.0
        if max_points is not None and len(pts) > max_points:
            keep = np.sort(rng.choice(len(pts), max_points, replace=False))
            pts = pts[keep]
            colors = colors[keep] if colors is not None else None
    if len(pts) == 0:
        raise ValueError(f"{path}: the file holds no points")
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: the file has non-finite coordinates")
    out = torch.as_tensor(np.asarray(pts, dtype=np.float32))
    if colors is not None:
        out = torch.cat([out, torch.as_tensor(colors, dtype=torch.float32)], dim=1)
    return out


def _has_colour(raw: Any) -> bool:
    """trimesh fills missing vertex colours with one default grey; a file's real colours vary or differ."""
    arr = np.asarray(raw)
    return arr.ndim == 2 and arr.shape[1] >= 3 and not (arr[:, :3] == np.array([102, 102, 102])).all()


def write_samples(
    samples: Mapping[str, Tensor], folder: str | os.PathLike[str], start_index: int = 0
) -> list[Path]:
    """Write every row of a decoded batch (the sample layout) as `folder/{start_index + i:05d}.ply`
    (its real points and, for colour models, colours)."""
    folder = Path(folder)
    points, mask = samples["points"].detach().cpu(), samples["mask"].detach().cpu()
    colors = samples.get("colors")
    out = []
    for i in range(points.shape[0]):
        real = mask[i] > 0
        c = None if colors is None else colors[i].detach().cpu()[real]
        out.append(write_point_cloud(folder / f"{start_index + i:05d}.ply", points[i][real], c))
    return out


def point_cloud_files(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The .ply/.obj files of a folder (sorted by name), or the given paths."""
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if src.is_dir():
            return sorted(p for p in src.iterdir() if p.suffix.lower() in SUFFIXES)
        return [src]
    return [Path(p) for p in source]


def iter_point_clouds(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], max_points: int | None = 96
) -> Iterator[tuple[str, Tensor | str]]:
    """`(file name, cloud)` for every readable file of `source` (a folder or paths), `(file name, error)`
    for the others, in order."""
    for path in point_cloud_files(source):
        try:
            yield path.name, read_point_cloud(path, max_points)
        except (OSError, ValueError) as e:
            yield path.name, str(e)
