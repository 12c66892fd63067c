"""PNG grids of rendered point clouds: what people look at (`save_samples`, the before/after callback).

Each sample is drawn as one tile per camera of `views` (default "pair": two views 90° apart), rendered by
the same soft point-splatting renderer the rewards use, at `image_size` pixels and inverted to dark
points on white; a grid has one labelled row per prompt and one group of tiles per seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.modalities.shape3d.render import parse_views, render_points

#: file `ShapeBackbone.save_samples` writes into the output folder of `diffalign sample`
SAMPLES_GRID = "samples.png"


@torch.no_grad()
def render_tiles(samples: Mapping[str, Tensor], views: Any = "pair", image_size: int = 64) -> Tensor:
    """(B, 3, H, V·W) uint8 tiles: each sample's views side by side, dark on white."""
    cams = parse_views(views)
    img = render_points(
        samples["points"].detach().float().cpu(),
        samples["mask"].detach().float().cpu(),
        cams,
        image_size,
        sigma=image_size / 32,
        colors=None if samples.get("colors") is None else samples["colors"].detach().float().cpu(),
        backend="torch",
    )  # (B, V, C, H, W)
    if img.shape[2] == 1:
        img = 1 - img.repeat(1, 1, 3, 1, 1)  # gray shading: dark points on white
    else:
        alpha = img.amax(2, keepdim=True)
        img = img + (1 - alpha)  # colours on white
    img = torch.cat(list(img.unbind(1)), dim=-1)  # views side by side
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def labelled_grid(rows: Sequence[tuple[str, Tensor]], title: str | None = None, pad: int = 3) -> Any:
    """A PIL image with one row per `(label, tiles (n, 3, H, W) uint8)`, the label on the left."""
    from PIL import Image, ImageDraw

    shapes = {tuple(t.shape[1:]) for _, t in rows if len(t)}
    if len(shapes) > 1:
        raise ValueError(f"grid tiles must share one shape, got {sorted(shapes)}")
    _, h, w = shapes.pop() if shapes else (3, 1, 1)
    columns = max([len(t) for _, t in rows] + [1])
    label_w = 0 if not any(label for label, _ in rows) else 8 + 7 * max(len(label) for label, _ in rows)
    top = 16 if title else 0
    canvas = Image.new(
        "RGB", (label_w + columns * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for r, (label, tiles) in enumerate(rows):
        y = top + pad + r * (h + pad)
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (label_w + pad + c * (w + pad), y))
            draw.rectangle(
                [label_w + pad + c * (w + pad) - 1, y - 1, label_w + pad + c * (w + pad) + w, y + h],
                outline="#bbbbbb",
            )
        if label:
            draw.text((4, y + h // 2 - 5), label, fill="black")
    return canvas


def prompt_rows(tiles: Tensor, prompts: Sequence[Any]) -> list[tuple[str, Tensor]]:
    """Tiles grouped into one row per prompt, in order of first appearance."""
    rows: dict[str, list[Tensor]] = {}
    for p, t in zip(prompts, tiles, strict=True):
        rows.setdefault(str(p), []).append(t)
    return [(p, torch.stack(ts)) for p, ts in rows.items()]


class ShapeGridWriter:
    """Collects decoded samples batch by batch and rewrites one PNG grid after each (`diffalign sample`).

    A call with `start_index` 0, another folder, or a `start_index` that does not continue the collected
    rows starts a new grid.
    """

    def __init__(self, filename: str = SAMPLES_GRID, views: Any = "pair", image_size: int = 64) -> None:
        self.filename, self.views, self.image_size = filename, views, image_size
        self.folder: Path | None = None
        self.tiles: list[Tensor] = []
        self.prompts: list[str] = []

    def __call__(
        self, samples: Mapping[str, Tensor], folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        folder = Path(folder)
        if start_index == 0 or folder != self.folder or start_index != len(self.prompts):
            self.folder, self.tiles, self.prompts = folder, [], []
        self.tiles.extend(render_tiles(samples, self.views, self.image_size))
        self.prompts.extend(str(p) for p in prompts)
        title = f"{folder.name}: {len(self.prompts)} samples, one row per prompt"
        grid = labelled_grid(prompt_rows(torch.stack(self.tiles), self.prompts), title)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        tmp = path.with_name(f".{path.name}.tmp")
        grid.save(tmp, format="PNG")
        tmp.replace(path)
        return path
