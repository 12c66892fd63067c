"""Moving digits: clips of a scikit-learn digit bouncing inside the frame with a known direction and speed.

Each clip is made from one of scikit-learn's 1,797 handwritten digits (8×8, values 0–16, divided by 16
to [0, 1]) drawn at its native size into a `frame_size`² black frame. The digit's centre of mass moves
by `velocity` pixels per frame and bounces (reflects) off the walls `COM_WALLS` = [5, 11] on both
axes (a 16-pixel frame): the rewards know these walls, so the ideal trajectory of a prompt is exact.
Frames are rendered by bilinear resampling (zero padding), which moves the centre of mass exactly by the
sub-pixel shift. Every clip is a pure function of (seed, index), so the data are the same in every run.

The sample layout of a clip (what `MovingDigitsDataModule` batches and `VideoBackbone.encode` takes) is
float (F, 1, H, W) in [0, 1]; a batch is (B, F, 1, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin
from diffalign.core.extras import require
from diffalign.modalities.video.conditions import (
    DIRECTIONS,
    SPEEDS,
    MotionCondition,
    all_conditions,
)

#: the centre-of-mass walls (in pixels, both axes) of the 16-pixel frames; scaled for other sizes
COM_WALLS = (5.0, 11.0)
FRAME_SIZE = 16
NUM_FRAMES = 8
DIGIT_SIZE = 8


def com_walls(frame_size: int = FRAME_SIZE) -> tuple[float, float]:
    """The centre-of-mass walls of a `frame_size` frame (16 → (5, 11); the digit stays 8×8, so the
    walls keep 5 pixels from each border: at the corners a few digits lose ink, moving their centre
    by at most 0.2 pixels)."""
    margin = COM_WALLS[0]
    return margin, frame_size - margin


def fold(p: Tensor, lo: float, hi: float) -> Tensor:
    """Positions `p` reflected into [lo, hi] (a ball bouncing between two walls); differentiable."""
    span = hi - lo
    q = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(q > span, 2 * span - q, q)


def bouncing_trajectory(
    start: Tensor, velocity: Tensor, num_frames: int, walls: tuple[float, float]
) -> Tensor:
    """Centres (…, F, 2) of a point starting at `start` (…, 2) moving by `velocity` (…, 2) (row, column)
    pixels per frame and bouncing off `walls` on both axes."""
    t = torch.arange(num_frames, dtype=start.dtype, device=start.device)
    free = start[..., None, :] + t[:, None] * velocity[..., None, :]
    return fold(free, *walls)


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    datasets = require("sklearn.datasets", "video", "the moving-digit clips")
    d = datasets.load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def load_digits_8x8(
    split: str = "all", holdout_fraction: float = 0.2, split_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits at their native 8×8, in [0, 1], (N, 8, 8), and labels (N,).

    `split`: "train", "test" (a seeded held-out `holdout_fraction`) or "all".
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    x, y = _digits()
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * holdout_fraction))
    idx = (perm[:n_test] if split == "test" else perm[n_test:]).sort().values
    return x[idx].clone(), y[idx].clone()


def centre_of_mass(images: Tensor) -> Tensor:
    """Intensity-weighted centre (…, 2) (row, column) in pixels of images (…, H, W)."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, dtype=images.dtype, device=images.device)
    cols = torch.arange(w, dtype=images.dtype, device=images.device)
    mass = images.sum(dim=(-2, -1)).clamp_min(1e-8)
    cy = (images.sum(-1) * rows).sum(-1) / mass
    cx = (images.sum(-2) * cols).sum(-1) / mass
    return torch.stack([cy, cx], dim=-1)


def render_clip(digit: Tensor, centres: Tensor, frame_size: int = FRAME_SIZE) -> Tensor:
    """Frames (F, 1, S, S) in [0, 1] showing `digit` (h, w) with its centre of mass at `centres` (F, 2).

    Bilinear resampling with zero padding: each frame's centre of mass is exactly its centre (as long
    as the digit's ink stays inside the frame).
    """
    h, w = digit.shape
    offset = centres - centre_of_mass(digit)  # (F, 2): where the digit's pixel (0, 0) lands
    grid_r = torch.arange(frame_size, dtype=digit.dtype)[None, :] - offset[:, :1]  # (F, S) source rows
    grid_c = torch.arange(frame_size, dtype=digit.dtype)[None, :] - offset[:, 1:]
    # normalised source coordinates for grid_sample (align_corners=True: -1 ↔ pixel 0, 1 ↔ pixel n-1)
    gy = (2 * grid_r / (h - 1) - 1)[:, :, None].expand(-1, -1, frame_size)
    gx = (2 * grid_c / (w - 1) - 1)[:, None, :].expand(-1, frame_size, -1)
    grid = torch.stack([gx, gy], dim=-1)  # (F, S, S, 2), x first
    src = digit[None, None].expand(len(centres), 1, h, w)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)


def make_clip(
    digit: Tensor,
    condition: MotionCondition,
    start: Tensor,
    num_frames: int = NUM_FRAMES,
    frame_size: int = FRAME_SIZE,
) -> Tensor:
    """One clip (F, 1, S, S) of `digit` moving as `condition` says from centre of mass `start` (2,)."""
    if condition.velocity is None:
        raise ValueError(f"a clip needs a direction and a speed, got {condition}")
    walls = com_walls(frame_size)
    centres = bouncing_trajectory(start, torch.tensor(condition.velocity), num_frames, walls)
    return render_clip(digit, centres, frame_size)


def start_position(condition: MotionCondition, frame_size: int, generator: torch.Generator) -> Tensor:
    """A start (2,) for a clip of `condition`: uniform inside the walls across the motion, and in the
    upstream half along it (a digit moving left starts in the right half), so every clip first heads the
    way its caption says before it bounces."""
    lo, hi = com_walls(frame_size)
    mid = (lo + hi) / 2
    u = torch.rand(2, generator=generator)
    start = lo + (hi - lo) * u
    axis = 0 if condition.direction in ("up", "down") else 1
    heads_positive = condition.direction in ("down", "right")
    start[axis] = (lo + (mid - lo) * u[axis]) if heads_positive else (mid + (hi - mid) * u[axis])
    return start


def noisy_condition(true: MotionCondition, fraction: float, generator: torch.Generator) -> MotionCondition:
    """`true` with each part (digit, direction, speed) replaced by a uniformly random value with
    probability `fraction` (wrong captions; a replacement can name the true value by chance)."""
    draw = torch.rand(3, generator=generator) < fraction
    digit = int(torch.randint(0, 10, (1,), generator=generator)) if draw[0] else true.digit
    direction = DIRECTIONS[int(torch.randint(0, 4, (1,), generator=generator))] if draw[1] else true.direction
    speed = SPEEDS[int(torch.randint(0, 2, (1,), generator=generator))] if draw[2] else true.speed
    return MotionCondition(digit, direction, speed)


class MovingDigits(Dataset):
    """Clip `i` of a seeded stream of moving digits: `(clip (F, 1, S, S) in [0, 1], caption, truth)`.

    Clip i draws (from a generator seeded with `seed` and i) a digit image, a direction, a speed and a
    start (`start_position`); its caption is the true condition, or with `caption_noise` a
    partly wrong one (`noisy_condition`); `truth` is the true condition.

    Args:
        images, labels: the digits (N, 8, 8) in [0, 1] and their labels.
        size: how many clips the stream has (the index range).
        num_frames, frame_size: clip shape.
        caption_noise: probability that each part of a caption is replaced by a random value.
        seed: stream seed.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        size: int = 1 << 20,
        num_frames: int = NUM_FRAMES,
        frame_size: int = FRAME_SIZE,
        caption_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
        if frame_size < 2 * COM_WALLS[0] + 1:
            raise ValueError(f"frame_size must be at least {int(2 * COM_WALLS[0]) + 1}, got {frame_size}")
        self.images, self.labels = images, labels
        self.size, self.num_frames, self.frame_size = size, num_frames, frame_size
        self.caption_noise, self.seed = caption_noise, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, MotionCondition, MotionCondition]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        k = int(torch.randint(0, len(self.labels), (1,), generator=g))
        direction = DIRECTIONS[int(torch.randint(0, len(DIRECTIONS), (1,), generator=g))]
        speed = SPEEDS[int(torch.randint(0, len(SPEEDS), (1,), generator=g))]
        truth = MotionCondition(int(self.labels[k]), direction, speed)
        start = start_position(truth, self.frame_size, g)
        clip = make_clip(self.images[k], truth, start, self.num_frames, self.frame_size)
        caption = noisy_condition(truth, self.caption_noise, g) if self.caption_noise > 0 else truth
        return clip, caption, truth


def collate_clips(rows: Sequence[tuple[Tensor, MotionCondition, MotionCondition]]) -> dict[str, object]:
    """`{"sample": (B, F, 1, H, W), "prompt": [caption text], "truth": [true condition text]}`."""
    clips, captions, truths = zip(*rows, strict=True)
    return {
        "sample": torch.stack(clips),
        "prompt": [c.text() for c in captions],
        "truth": [t.text() for t in truths],
    }


def evaluation_prompts(n: int = 16) -> list[str]:
    """A fixed list of `n` fully specified prompts covering the 10 digits and the 8 motions evenly
    (prompt i: digit i mod 10, motion i mod 8)."""
    motions = [(r, s) for r in DIRECTIONS for s in SPEEDS]
    return [MotionCondition(i % 10, *motions[i % len(motions)]).text() for i in range(n)]


#: the evaluation prompts of the video recipes (16 prompts: every digit, every motion twice)
EVAL_PROMPTS: tuple[str, ...] = tuple(evaluation_prompts(16))
#: every fully specified prompt (80)
ALL_PROMPTS: tuple[str, ...] = tuple(c.text() for c in all_conditions())


class MovingDigitsDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Moving-digit clips for pretraining: batches `{"sample": (B, F, 1, H, W) in [0, 1], "prompt":
    [...], "truth": [...]}` from the digits' training split, in a per-epoch seeded order.

    The evaluation set is `eval_prompts` (default `EVAL_PROMPTS`) × `eval_seeds_per_prompt` seeds.

    Args:
        num_frames, frame_size: clip shape.
        batch_size, batches_per_epoch: clips per batch and batches per epoch.
        holdout_fraction, split_seed: the held-out digits (never trained on).
        caption_noise: probability that each part of a caption names a random value instead.
        seed: the clip stream's seed and the order seed.
        eval_prompts, eval_seeds_per_prompt, eval_seed: the fixed evaluation set.
    """

    def __init__(
        self,
        num_frames: int = NUM_FRAMES,
        frame_size: int = FRAME_SIZE,
        batch_size: int = 32,
        batches_per_epoch: int = 25,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        caption_noise: float = 0.0,
        seed: int = 0,
        eval_prompts: list[str] | None = None,
        eval_seeds_per_prompt: int = 8,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        images, labels = load_digits_8x8("train", holdout_fraction, split_seed)
        self.dataset = MovingDigits(
            images,
            labels,
            num_frames=num_frames,
            frame_size=frame_size,
            caption_noise=caption_noise,
            seed=seed,
        )
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.eval_prompts = list(eval_prompts) if eval_prompts else list(EVAL_PROMPTS)
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.dataset), self.batch_size * self.batches_per_epoch, self.seed, replacement=False
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_clips)
