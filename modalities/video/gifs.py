"""Pictures of clips: animated GIF grids and PNG contact sheets (Pillow only).

- `gif_grid(rows)`: one animated grid — one labelled row per prompt, one tile per clip, all tiles
  playing their frames in step;
- `contact_sheet(rows)`: one PNG — one labelled line per clip with its frames left to right;
- `ClipGridWriter`: what `VideoBackbone.save_samples` (`diffalign sample`) uses: collects clips batch by
  batch and rewrites `samples.gif` and `samples.png`.

Clips are in the video sample layout, (n, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SAMPLES_GIF = "samples.gif"
SAMPLES_SHEET = "samples.png"
LABEL_CHAR_WIDTH = 6


def _uint8(clips: Tensor) -> Any:
    """(n, F, 3, H, W) in [0, 1] → numpy (n, F, H, W, 3) uint8."""
    if clips.dim() != 5 or clips.shape[2] not in (1, 3):
        raise ValueError(f"expected clips (n, F, 3, H, W) in [0, 1], got {tuple(clips.shape)}")
    x = clips.detach().float().cpu().clamp(0, 1)
    if x.shape[2] == 1:
        x = x.expand(-1, -1, 3, -1, -1)
    return (x.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).numpy()


def _label_width(labels: Sequence[str]) -> int:
    return 0 if not any(labels) else 8 + LABEL_CHAR_WIDTH * max(len(s) for s in labels)


def gif_grid(
    rows: Sequence[tuple[str, Tensor]], scale: int = 4, title: str | None = None, pad: int = 2
) -> list[Any]:
    """Frames (PIL images) of an animated grid: one row per `(label, clips (n, F, 3, H, W))`, its label on
    the left, one tile per clip, upscaled `scale`× (nearest). Rows may hold different numbers of clips;
    every clip must have the same shape."""
    from PIL import Image, ImageDraw

    arrays = [(label, _uint8(clips)) for label, clips in rows]
    shapes = {a.shape[1:] for _, a in arrays if len(a)}
    if len(shapes) != 1:
        raise ValueError(f"grid clips must share one shape (F, H, W, 3), got {sorted(shapes)}")
    num_frames, h, w, _ = shapes.pop()
    cell_h, cell_w = h * scale, w * scale
    columns = max(len(a) for _, a in arrays)
    label_w = _label_width([label for label, _ in arrays])
    top = 14 if title else 0
    size = (label_w + columns * (cell_w + pad) + pad, top + len(arrays) * (cell_h + pad) + pad)
    frames = []
    for f in range(num_frames):
        canvas = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(canvas)
        if title:
            draw.text((4, 1), f"{title}  frame {f + 1}/{num_frames}", fill="black")
        for r, (label, a) in enumerate(arrays):
            y = top + pad + r * (cell_h + pad)
            for c, clip in enumerate(a):
                tile = Image.fromarray(clip[f]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (label_w + pad + c * (cell_w + pad), y))
            if label:
                draw.text((4, y + cell_h // 2 - 5), label, fill="black")
        frames.append(canvas)
    return frames


def save_gif(frames: Sequence[Any], path: str | Path, frame_ms: int = 200) -> Path:
    """Write PIL `frames` as a looping animated GIF (atomically)."""
    from diffalign.core.io import atomic_write

    frames = list(frames)
    if not frames:
        raise ValueError("save_gif needs at least one frame")

    def write(p: Path) -> None:
        frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)

    return atomic_write(path, write)


def contact_sheet(
    rows: Sequence[tuple[str, Tensor]], scale: int = 2, title: str | None = None, pad: int = 2
) -> Any:
    """A PIL image with one line per clip: its label on the left (the row's label on its first clip),
    then its frames left to right, upscaled `scale`×."""
    from PIL import Image, ImageDraw

    lines = []
    for label, clips in rows:
        for i, clip in enumerate(_uint8(clips)):
            lines.append((label if i == 0 else "", clip))
    if not lines:
        raise ValueError("contact_sheet needs at least one clip")
    num_frames, h, w, _ = lines[0][1].shape
    cell_h, cell_w = h * scale, w * scale
    label_w = _label_width([label for label, _ in lines])
    top = 14 if title else 0
    size = (label_w + num_frames * (cell_w + pad) + pad, top + len(lines) * (cell_h + pad) + pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill="black")
    for r, (label, clip) in enumerate(lines):
        y = top + pad + r * (cell_h + pad)
        for f, frame in enumerate(clip):
            canvas.paste(
                Image.fromarray(frame).resize((cell_w, cell_h), Image.NEAREST),
                (label_w + pad + f * (cell_w + pad), y),
            )
        if label:
            draw.text((4, y + cell_h // 2 - 5), label, fill="black")
    return canvas


def write_clip_pictures(
    rows: Sequence[tuple[str, Tensor]],
    folder: str | Path,
    stem: str,
    title: str | None = None,
    scale: int = 4,
) -> tuple[Path, Path]:
    """`folder/<stem>.gif` (the animated grid) and `folder/<stem>.png` (the contact sheet) of `rows`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gif = save_gif(gif_grid(rows, scale, title), folder / f"{stem}.gif")
    sheet = contact_sheet(rows, max(1, scale // 2), title)
    from diffalign.core.io import atomic_write

    png = atomic_write(folder / f"{stem}.png", lambda p: sheet.save(p, format="PNG"))
    return gif, png


class ClipGridWriter:
    """Collects decoded clips batch by batch and rewrites `samples.gif` and `samples.png` after each.

    One row per prompt (in order of first appearance), one clip per sample of that prompt (for
    `diffalign sample`: its seeds, in order). A call with `start_index` 0, another folder, or a
    `start_index` that does not continue the collected clips starts afresh.
    """

    def __init__(self, stem: str = "samples", scale: int = 4) -> None:
        self.stem, self.scale = stem, scale
        self.folder: Path | None = None
        self.rows: dict[str, list[Tensor]] = {}
        self.count = 0

    def __call__(
        self, samples: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """Add a batch (`samples` (B, F, 3, H, W) in [0, 1], its B prompts); returns the GIF's path."""
        if samples.dim() != 5 or samples.shape[0] != len(prompts):
            raise ValueError(
                f"expected clips (B, F, 3, H, W) with one prompt per clip, got {tuple(samples.shape)} "
                f"and {len(prompts)} prompts"
            )
        folder = Path(folder)
        if start_index == 0 or folder != self.folder or start_index != self.count:
            self.folder, self.rows, self.count = folder, {}, 0
        clips = (samples.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        for prompt, clip in zip(prompts, clips, strict=True):
            self.rows.setdefault(str(prompt), []).append(clip)
        self.count = start_index + len(prompts)
        rows = [(p, torch.stack(c).float() / 255) for p, c in self.rows.items()]
        title = f"{folder.name}: {self.count} clips"
        gif, _ = write_clip_pictures(rows, folder, self.stem, title, self.scale)
        return gif


def save_sample_clips(
    owner: Any,
    samples: Tensor,
    folder: str | Path,
    prompts: Sequence[Any],
    start_index: int = 0,
    scale: int = 4,
) -> Path:
    """What the video backbones' `save_samples` write for `diffalign sample`: `folder/samples.gif` and
    `folder/samples.png` (all clips so far, `ClipGridWriter`, kept on `owner` between batches) and each clip
    as `folder/clips/clip_<index>.gif` with its prompt in `folder/clips/prompts.json`."""
    from diffalign.modalities.video.io import write_clips

    writer = getattr(owner, "_grid_writer", None)
    if writer is None:
        writer = ClipGridWriter(scale=scale)
        owner._grid_writer = writer
    write_clips(samples, Path(folder) / "clips", prompts, start_index)
    return writer(samples, folder, prompts, start_index=start_index)
