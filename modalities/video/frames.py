"""Frame selection: which frames of a clip a reward asks `decode` for (VADER's `--decode_frame`).

`Reward.request = {"frames": spec}` with spec one of

- `"all"` (or no request): every frame;
- `"random"`: one frame per clip, drawn uniformly from the generator the core passes with the request
  (VADER's `-1`: the cheapest way to score frames, since decoding whole clips is where memory runs out);
- `"first_middle_last"`: frames 0, F // 2 and F − 1 (VADER's `fml`);
- an int k ≥ 1: every k-th frame, 0, k, 2k, … (k = 2 is VADER's `alt`);
- a list of frame indices (negative indices count from the end).

`frame_indices` turns a spec into a (B, F') long tensor of indices per clip; backbones decode only
those frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

FRAME_SPECS = ("all", "random", "first_middle_last")


def frame_indices(
    spec: Any, num_frames: int, batch_size: int, generator: torch.Generator | None = None, device: Any = None
) -> Tensor:
    """The frames (B, F') each clip decodes for `spec` (see the module docs).

    A "random" spec draws from `generator` (the core passes the view's generator; None draws from
    torch's global generator, which `seed_everything` seeds).
    """
    if spec is None or (isinstance(spec, str) and spec == "all"):
        idx = torch.arange(num_frames)
    elif isinstance(spec, str) and spec == "random":
        gen = generator if generator is None or generator.device.type == "cpu" else None
        return torch.randint(0, num_frames, (batch_size, 1), generator=gen).to(device)
    elif isinstance(spec, str) and spec == "first_middle_last":
        idx = torch.tensor(sorted({0, num_frames // 2, num_frames - 1}))
    elif isinstance(spec, bool):
        raise ValueError(f"frames must be one of {FRAME_SPECS}, an int k or a list of indices, got {spec!r}")
    elif isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"frames = k (every k-th frame) needs k >= 1, got {spec}")
        idx = torch.arange(0, num_frames, spec)
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
        bad = [
            i
            for i in spec
            if not isinstance(i, int) or isinstance(i, bool) or not -num_frames <= i < num_frames
        ]
        if bad:
            raise ValueError(f"frame indices must be ints in [-{num_frames}, {num_frames}), got {bad}")
        idx = torch.tensor([i % num_frames for i in spec])
    else:
        raise ValueError(f"frames must be one of {FRAME_SPECS}, an int k or a list of indices, got {spec!r}")
    return idx[None, :].expand(batch_size, -1).to(device)


def gather_frames(clips: Tensor, idx: Tensor) -> Tensor:
    """Frames `idx` (B, F') of `clips` (B, F, …) → (B, F', …)."""
    rows = torch.arange(clips.shape[0], device=clips.device)[:, None]
    return clips[rows, idx.to(clips.device)]
