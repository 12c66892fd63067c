"""Point-cloud files: PLY and OBJ through trimesh, for `diffalign sample` outputs and for scoring files.

- `write_point_cloud(path, points, colors)`: one cloud as .ply (binary, with RGB when given) or .obj
  (vertices only);
- `read_point_cloud(path, max_points)`: the points (n, 3) — or (n, 6) with colours in [0, 1] — of a
  .ply/.obj file. A file with faces (a mesh) is sampled on its surface (`max_points` points, area-uniform,
  seeded); a point cloud with more than `max_points` points is subsampled (seeded), so any file fits
  a model's `max_points`;
- `write_samples(samples, folder)`: every row of a decoded batch as `{index:05d}.ply`;
- `collate_clouds(clouds)`: clouds of different sizes as one batch of the sample layout
  `{"points": (B, N, 3), "mask": (B, N)[, "colors"]}`, zero-padded;
- `PointCloudReader`: the reader of `diffalign score` (a folder of .ply/.obj files, or one file; one
  record per file in name order; a file that cannot be read is that record's error row).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.core.score.readers import Reader, ReadError, Record, relative_id

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


def read_point_cloud(
    path: str | os.PathLike[str], max_points: int | None = 96, seed: int = 0, mesh_points: int | None = None
) -> Tensor:
    """The points of a .ply / .obj file as float (n, 3), or (n, 6) with colours in [0, 1] when the file
    has per-point colours. Meshes are sampled on their surface (`mesh_points` points, default
    `max_points`, else 96; never more than `max_points`); larger clouds are subsampled to `max_points`
    (both seeded). Raises ValueError naming the file when it holds no points."""
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
        n = min(mesh_points or max_points or 96, max_points or mesh_points or 96)
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


def collate_clouds(clouds: list[Tensor]) -> dict[str, Tensor]:
    """Clouds (n_i, 3) — or all (n_i, 6) with colours — as one zero-padded batch of the sample layout
    `{"points": (B, N, 3), "mask": (B, N)[, "colors": (B, N, 3)]}`, N the largest n_i. Raises ValueError
    for a mix of clouds with and without colours (the engine then scores them one at a time)."""
    from diffalign.core.functional import pad_stack

    if not clouds:
        raise ValueError("collate_clouds got no clouds")
    widths = {int(c.shape[1]) for c in clouds}
    if len(widths) > 1:
        raise ValueError("clouds with and without colours cannot form one batch")
    values, mask = pad_stack([c.float() for c in clouds], 0)
    mask = mask.reshape(values.shape[:2]).float()
    out = {"points": values[..., :3], "mask": mask}
    if values.shape[-1] >= 6:
        out["colors"] = values[..., 3:6]
    return out


class PointCloudReader(Reader):
    """Reads .ply/.obj files for `diffalign score` into the shape sample layout (what the shape rewards
    of `diffalign.rewards.shape3d` take).

    The input is one file or a folder of them (the folder itself only, unless `recursive=True`); one
    record per file, in name order, with id the path relative to the folder (the key of a `prompts.csv`
    inside it: `file,prompt` rows; or `--prompt "a box"` for all). `load` (in the workers) reads a file
    with `read_point_cloud`: a mesh is sampled on its surface (`mesh_points` points, seeded), a cloud of
    more than `max_points` points is subsampled (seeded; default keep every point); a file that does not
    read is that record's error. `collate` pads the clouds of a chunk to one batch (`collate_clouds`),
    the padding masked out, so a file scores the same in any batch.

    Args:
        max_points: subsample larger clouds to this many points (None: keep all).
        mesh_points: surface samples taken from a mesh.
        recursive: also read files in subfolders.
    """

    source_column = "path"
    suffixes = (*SUFFIXES, "/")
    chunk_size = 32

    def __init__(
        self, max_points: int | None = None, mesh_points: int = 1024, recursive: bool = False
    ) -> None:
        if max_points is not None and int(max_points) < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        if int(mesh_points) < 1:
            raise ValueError(f"mesh_points must be >= 1, got {mesh_points}")
        self.max_points = None if max_points is None else int(max_points)
        self.mesh_points = int(mesh_points)
        self.recursive = bool(recursive)

    def records(self, path: Path) -> Iterator[Record]:
        path = Path(path)
        if path.is_file():
            return iter([Record(path.name, payload=str(path), source=str(path))])
        try:
            found = path.rglob("*") if self.recursive else path.iterdir()
            files = sorted(
                (p for p in found if p.suffix.lower() in SUFFIXES and p.is_file()),
                key=lambda p: relative_id(p, path),
            )
        except OSError as e:
            raise ReadError(f"cannot list {path}: {e}") from None
        return (Record(relative_id(f, path), payload=str(f), source=str(f)) for f in files)

    def load(self, payload: Any) -> Tensor:
        return read_point_cloud(payload, max_points=self.max_points, mesh_points=self.mesh_points)

    def collate(self, samples: list[Tensor]) -> dict[str, Tensor]:
        return collate_clouds(samples)
