"""Clips on disk: animated GIFs, folders of frames, and saved tensors, read into the clip layout.

- `read_clip(path)` → frames (F, 3, H, W) in [0, 1] from a `.gif`, a `.pt` tensor ((F, C, H, W) in
  [0, 1], what `diffalign feedback` saves), or a folder of frame images (`.png`/`.jpg`, in name order);
- `iter_clips(path)` → (id, clip or error message) for one clip or a folder of clips, lazily; a folder
  holds clips (GIFs, `.pt` files, sub-folders of frames) or is itself one folder of frames;
- `clip_prompts(folder)` → the prompt of each clip: from `prompts.json` ({file name: prompt}) when the
  folder has one (`write_clips` writes it), else each clip's file name;
- `ClipReader`: the reader of `diffalign score` for all of these;
- `write_clip_gif` / `write_clips`: one GIF per clip (what `VideoBackbone.save_samples` writes under
  `clips/` for `diffalign sample`); `write_clip_video`: one clip as an MP4 (or any container PyAV writes).

Video files (`.mp4`, `.webm`, `.avi`, `.mov`, `.mkv`) are read and written through PyAV (`av`, the optional
`diffalign[video]` extra, which bundles its own FFmpeg libraries); without it they are refused with an error
naming the extra.

Pillow merges identical consecutive GIF frames into one longer frame; `write_clip_gif` records the frame
duration in the GIF's comment and `read_clip` expands merged frames again from their durations, so a
static clip reads back with all its frames.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.core.score.readers import Reader, ReadError, Record

CLIP_SUFFIXES = (".gif", ".pt")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
PROMPTS_FILE = "prompts.json"
FRAME_MS = 200


def _frames_to_tensor(frames: Sequence[Any]) -> Tensor:
    import numpy as np

    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in frames])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _read_gif(path: Path) -> Tensor:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        comment = im.info.get("comment", b"")
        frames, durations = [], []
        for frame in ImageSequence.Iterator(im):
            frames.append(frame.convert("RGB"))
            durations.append(int(frame.info.get("duration", 0) or 0))
    if not frames:
        raise ValueError(f"{path}: the GIF has no frames")
    text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    written = [int(w.split("=")[1]) for w in text.split() if w.startswith("frame_ms=") and w[9:].isdigit()]
    base = written[0] if written else min((d for d in durations if d > 0), default=0)
    repeats = [max(1, round(d / base)) if base else 1 for d in durations]
    return _frames_to_tensor([f for f, r in zip(frames, repeats, strict=True) for _ in range(r)])


def _read_frame_folder(path: Path) -> Tensor:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    frames = [Image.open(p) for p in files]
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"{path}: frames of different sizes {sorted(sizes)}")
    return _frames_to_tensor(frames)


def _read_tensor(path: Path) -> Tensor:
    x = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{path}: expected a clip tensor (F, 3 | 1, H, W) in [0, 1], got {shape}")
    x = x.float()
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{path}: clip values must be in [0, 1], got [{x.min():.3f}, {x.max():.3f}]")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _read_video(path: Path) -> Tensor:
    import numpy as np

    from diffalign.core.extras import require

    av = require("av", "video", f"reading {path.suffix} clips")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    arr = np.stack(frames).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def write_clip_video(
    clip: Tensor, path: str | Path, fps: int = 1000 // FRAME_MS, lossless: bool = True
) -> Path:
    """One clip (F, 3 | 1, H, W) in [0, 1] as a video file through PyAV: H.264 (`libx264`) in 4:4:4, CRF 0
    when `lossless` (the YUV conversion still rounds: about 1/255), else CRF 18 in 4:2:0 (what players
    expect; even H and W). The container follows the suffix (`.mp4`, `.mkv`, …)."""
    from diffalign.core.extras import require

    av = require("av", "video", "writing video clips")
    if clip.dim() != 4 or clip.shape[1] not in (1, 3):
        raise ValueError(f"expected a clip (F, 3 | 1, H, W) in [0, 1], got {tuple(clip.shape)}")
    x = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    arr = x.permute(0, 2, 3, 1).contiguous().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        stream.options = {"crf": "0" if lossless else "18"}
        for a in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_clip(path: str | Path) -> Tensor:
    """Frames (F, 3, H, W) in [0, 1] of a GIF, a `.pt` clip tensor, a video file (PyAV) or a folder of
    frame images."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip not found: {path}")
    if path.is_dir():
        return _read_frame_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _read_gif(path)
    if suffix == ".pt":
        return _read_tensor(path)
    if suffix in VIDEO_SUFFIXES:
        return _read_video(path)
    raise ValueError(
        f"{path}: not a clip ({', '.join((*CLIP_SUFFIXES, *VIDEO_SUFFIXES))} or a folder of frames)"
    )


def is_frame_folder(path: Path) -> bool:
    """A folder whose entries are frame images only (one clip)."""
    entries = [p for p in path.iterdir() if p.name != PROMPTS_FILE and not p.name.startswith(".")]
    return bool(entries) and all(p.is_file() and p.suffix.lower() in FRAME_SUFFIXES for p in entries)


def clip_paths(path: str | Path) -> list[Path]:
    """The clips at `path`: itself (a clip file or a frame folder), or the clips inside a folder (name
    order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such clip or folder: {path}")
    if path.is_file() or is_frame_folder(path):
        return [path]
    return sorted(
        p
        for p in path.iterdir()
        if (p.is_file() and p.suffix.lower() in (*CLIP_SUFFIXES, *VIDEO_SUFFIXES))
        or (p.is_dir() and is_frame_folder(p))
    )


def clip_prompts(folder: str | Path) -> dict[str, Any]:
    """{clip file name: prompt} from the folder's `prompts.json` (empty when it has none)."""
    file = Path(folder) / PROMPTS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected an object {{clip file name: prompt}}")
    return data


def manifest_clips(path: str | Path) -> list[tuple[Path, Any]]:
    """(clip path, prompt) of every clip a `prompts.json` manifest lists (paths relative to it)."""
    path = Path(path)
    prompts = clip_prompts(path.parent) if path.name == PROMPTS_FILE else None
    if prompts is None:
        raise ValueError(f"{path}: a clip manifest is named {PROMPTS_FILE}")
    return [(path.parent / name, prompt) for name, prompt in prompts.items()]


def iter_clips(path: str | Path) -> Iterator[tuple[str, Tensor | str, Any]]:
    """(id, frames (F, 3, H, W) or the reason it could not be read, prompt) for each clip at `path`, lazily.

    The prompt comes from the folder's `prompts.json`, else it is the clip's file name stem (the video
    parser reads "3_left_fast.gif" as a 3 moving left, fast).
    """
    paths = clip_paths(path)
    prompts = clip_prompts(paths[0].parent) if paths else {}
    for p in paths:
        prompt = prompts.get(p.name, p.stem)
        try:
            yield p.name, read_clip(p), prompt
        except (OSError, ValueError, RuntimeError) as e:
            yield p.name, f"{type(e).__name__}: {e}", prompt


def write_clip_gif(clip: Tensor, path: str | Path, frame_ms: int = FRAME_MS) -> Path:
    """One clip (F, 3 | 1, H, W) in [0, 1] as a looping GIF (grayscale when the channels are equal)."""
    from PIL import Image

    from diffalign.core.io import atomic_write

    if clip.dim() != 4 or clip.shape[1] not in (1, 3):
        raise ValueError(f"expected a clip (F, 3 | 1, H, W) in [0, 1], got {tuple(clip.shape)}")
    x = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    gray = x.shape[1] == 1 or bool((x == x[:, :1]).all())
    arr = x[:, :1].squeeze(1).numpy() if gray else x.permute(0, 2, 3, 1).numpy()
    frames = [Image.fromarray(a, mode="L" if gray else "RGB") for a in arr]

    def write(p: Path) -> None:
        frames[0].save(
            p,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=frame_ms,
            loop=0,
            comment=f"diffalign clip frame_ms={frame_ms}",
        )

    return atomic_write(path, write)


def write_clips(
    clips: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
) -> list[Path]:
    """Write each clip of `clips` (B, F, 3, H, W) as `folder/clip_<index>.gif` and add its prompt to
    `folder/prompts.json`."""
    from diffalign.core.io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = clip_prompts(folder) if start_index else {}
    paths = []
    for i, (clip, prompt) in enumerate(zip(clips, prompts, strict=True)):
        path = write_clip_gif(clip, folder / f"clip_{start_index + i:06d}.gif")
        index[path.name] = prompt
        paths.append(path)
    write_json(folder / PROMPTS_FILE, index)
    return paths


class ClipReader(Reader):
    """Reads clips for `diffalign score` into the clip layout (F, 3, H, W) in [0, 1].

    The input is one clip (`.gif`, `.pt`, `.mp4` and other video files through PyAV, a folder of frames), a
    folder of clips, or a clip folder's
    `prompts.json` manifest (what `diffalign sample` writes under `clips/`). Each clip is one record
    with id its file name and prompt from `prompts.json`, else its file name stem ("3_left_fast.gif").
    Clips of one shape are scored as a batch; mixed shapes are scored one at a time.
    """

    source_column = "path"
    suffixes = (*CLIP_SUFFIXES, *VIDEO_SUFFIXES, ".json", "/")
    chunk_size = 16
    has_prompts = True

    def records(self, path: Path) -> Iterator[Record]:
        path = Path(path)
        try:
            if path.suffix.lower() == ".json":
                clips = manifest_clips(path)
            else:
                paths = clip_paths(path)
                prompts = clip_prompts(paths[0].parent) if paths else {}
                clips = [(p, prompts.get(p.name, p.stem)) for p in paths]
        except (OSError, ValueError) as e:
            raise ReadError(str(e)) from None
        return (Record(p.name, payload=str(p), source=str(p), prompt=prompt) for p, prompt in clips)

    def load(self, payload: Any) -> Tensor:
        return read_clip(payload)

    def collate(self, samples: list[Tensor]) -> Tensor:
        if len({tuple(s.shape) for s in samples}) > 1:
            raise ValueError("clips of different shapes cannot form one batch")
        return torch.stack(samples)
