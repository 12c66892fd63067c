"""Labelled image grids: the drawing behind `SampleGrid` and `ImageBackbone.save_samples`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: file `ImageBackbone.save_samples` writes into the output folder of `diffalign sample`
SAMPLES_GRID = "samples.png"


def default_scale(height: int, width: int, target: int = 64) -> int:
    """Nearest-neighbour upscaling that makes small tiles about `target` pixels (16×16 digits: 4×)."""
    return max(1, target // max(height, width))


def labelled_grid(
    rows: Sequence[tuple[str, Tensor]],
    scale: int | None = None,
    title: str | None = None,
    columns: int | None = None,
) -> Any:
    """A PIL image with one row of tiles per `(label, images)` entry, the label on the left.

    `images` are (n, 3, H, W) in [0, 1] (the image sample layout; n may differ between rows, shorter
    rows end early); tiles are upscaled `scale`× with nearest-neighbour (default `default_scale`). The
    grid is as wide as its longest row, or `columns` tiles if that is more.
    """
    from PIL import Image, ImageDraw

    rows = [(label, imgs) for label, imgs in rows]
    shapes = {tuple(imgs.shape[1:]) for _, imgs in rows if len(imgs)}
    if len(shapes) > 1:
        raise ValueError(f"grid tiles must share one shape, got {sorted(shapes)}")
    _, h, w = shapes.pop() if shapes else (3, 1, 1)
    scale = scale or default_scale(h, w)
    columns = max([len(imgs) for _, imgs in rows] + [columns or 1])
    cell_h, cell_w, pad = h * scale, w * scale, 2
    labels = [label for label, _ in rows]
    label_w = 0 if not any(labels) else 8 + 7 * max(len(s) for s in labels)
    top = 16 if title else 0
    size = (label_w + columns * (cell_w + pad) + pad, top + len(rows) * (cell_h + pad) + pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for r, (label, imgs) in enumerate(rows):
        y = top + pad + r * (cell_h + pad)
        arr = (imgs.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
        for c, tile in enumerate(arr.astype("uint8")):
            tile_img = Image.fromarray(tile).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile_img, (label_w + pad + c * (cell_w + pad), y))
        if label:
            draw.text((4, y + cell_h // 2 - 5), label, fill="black")
    return canvas


def image_grid(
    images: Tensor,
    columns: int,
    row_labels: list[str] | None = None,
    scale: int = 4,
    title: str | None = None,
) -> Any:
    """A PIL image: `images` (N, 3, H, W) in [0, 1] in rows of `columns`, upscaled `scale`× (nearest),
    each row labelled on the left, an optional title on top."""
    n = images.shape[0]
    labels = list(row_labels or [])
    rows = [
        (labels[r] if r < len(labels) else "", images[r * columns : (r + 1) * columns])
        for r in range(-(-n // columns))
    ]
    return labelled_grid(rows, scale, title, columns)


class PromptGridWriter:
    """Collects decoded samples batch by batch and rewrites one grid PNG after every batch.

    One row per prompt (in order of first appearance), one column per sample of that prompt (for
    `diffalign sample`: its seeds, in order); a prompt with more than `max_columns` samples wraps onto
    unlabelled continuation rows. A call with `start_index` 0, another folder, or a `start_index` that
    does not continue the collected rows starts a new grid.

    Args:
        filename: the PNG written into the output folder.
        scale: tile upscaling (default `default_scale`: 16×16 digits become 64×64).
        max_columns: samples per row before a prompt wraps.
    """

    def __init__(self, filename: str = SAMPLES_GRID, scale: int | None = None, max_columns: int = 32) -> None:
        if max_columns < 1:
            raise ValueError(f"max_columns must be >= 1, got {max_columns}")
        self.filename, self.scale, self.max_columns = filename, scale, max_columns
        self.folder: Path | None = None
        self.rows: dict[str, list[Tensor]] = {}
        self.count = 0

    def __call__(
        self, samples: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """Add a batch (`samples` (B, 3, H, W) in [0, 1], its B `prompts`) and rewrite the grid."""
        if samples.dim() != 4 or samples.shape[0] != len(prompts):
            raise ValueError(
                f"expected samples (B, 3, H, W) with one prompt per row, got {tuple(samples.shape)} "
                f"and {len(prompts)} prompts"
            )
        folder = Path(folder)
        if start_index == 0 or folder != self.folder or start_index != self.count:
            self.folder, self.rows, self.count = folder, {}, 0
        images = (samples.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        for prompt, img in zip(prompts, images, strict=True):
            self.rows.setdefault(str(prompt), []).append(img)
        self.count = start_index + len(prompts)
        rows: list[tuple[str, Tensor]] = []
        for prompt, imgs in self.rows.items():
            for k in range(0, len(imgs), self.max_columns):
                chunk = torch.stack(imgs[k : k + self.max_columns]).float() / 255
                rows.append((prompt if k == 0 else "", chunk))
        noun = "sample" if self.count == 1 else "samples"
        title = f"{folder.name}: {self.count} {noun}, one row per prompt"
        path = folder / self.filename
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        labelled_grid(rows, self.scale, title).save(tmp, format="PNG")
        tmp.replace(path)
        return path
