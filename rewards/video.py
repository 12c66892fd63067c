"""Rewards for clips in the video modality's sample layout: float (B, F, 3, H, W) in [0, 1].

Every reward reads what each clip was asked for from `cond["prompt"]` with the modality's parser
(`modalities.video.conditions.parse_conditions`: text such as "a 3 moving left, fast" or dicts with
digit / direction / speed) and asks `decode` for the frames it needs (`request`).

- `FrameDigitFidelity`: per-frame probability that the image modality's digit classifier gives the
  prompted digit, on a window centred on each frame's centre of mass (the classifier was trained on
  centred digits); frame selection (`frames`: "random", every k-th, "first_middle_last", "all", a list)
  and a mean or min over the scored frames. Differentiable.
- `TemporalFlicker`: VBench's temporal flickering, 1 − mean |frame_t − frame_{t+1}|. A static clip scores
  1: read it beside the motion magnitude it reports (`info["motion_px"]`). Differentiable.
- `SubjectConsistency`: VBench's subject consistency with the digit classifier's features of the
  centred windows: mean over t ≥ 1 of ½·(cos(f_t, f_0) + cos(f_t, f_{t−1})). Differentiable.
- `MotionAgreement`: how closely the centre-of-mass trajectory follows the prompted direction and
  speed, bouncing off the data's walls: mean over t ≥ 1 of exp(−‖c_t − c*_t‖² / 2σ²), c*_t the ideal
  trajectory from the clip's first centre. Differentiable.
- `FrameImageReward`: any image reward (the image layout (B, 3, H, W)) applied to the selected frames, per
  frame, with a mean or min: the image half of the image + temporal reward mixes of T2V-Turbo / VADER.
- `MotionClassifierReward`: probability the in-project motion classifier (trained on generated clips,
  `modalities/video/train_motion_classifier.py`) gives the prompted (direction, speed). Differentiable.

`info["motion_px"]` (mean centre-of-mass displacement per frame, pixels) is reported by the temporal
rewards: a gain in flicker or consistency that comes from static clips shows there.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond
from diffalign.modalities.video.conditions import MotionCondition, parse_conditions

CLIP_READER = "diffalign.modalities.video.io.ClipReader"  # what `diffalign score` reads clips with

#: ink below this intensity is treated as background when locating the digit (generated frames have a
#: faint noisy background that would pull the centre of mass towards the middle)
INK_FLOOR = 0.2


def _check_clips(samples: Any, who: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() != 5 or samples.shape[2] not in (1, 3):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"{who} expects clips (B, F, 3, H, W) in [0, 1], got {shape}")
    return samples


def gray_frames(clips: Tensor) -> Tensor:
    """(B, F, C, H, W) → (B, F, H, W), the channel mean."""
    return clips.float().mean(dim=2)


def ink_centres(frames: Tensor, floor: float = INK_FLOOR) -> Tensor:
    """Centre of mass (…, 2) (row, column, pixels) of the ink (intensity above `floor`) of frames (…, H, W);
    a frame with no ink gets the frame centre. Differentiable."""
    h, w = frames.shape[-2:]
    mass = torch.relu(frames - floor)
    total = mass.sum(dim=(-2, -1))
    rows = torch.arange(h, dtype=frames.dtype, device=frames.device)
    cols = torch.arange(w, dtype=frames.dtype, device=frames.device)
    cy = (mass.sum(-1) * rows).sum(-1) / total.clamp_min(1e-6)
    cx = (mass.sum(-2) * cols).sum(-1) / total.clamp_min(1e-6)
    centre = torch.stack([cy, cx], dim=-1)
    empty = (total < 1e-6)[..., None]
    return torch.where(empty, torch.tensor([(h - 1) / 2, (w - 1) / 2], device=frames.device), centre)


def centred_windows(frames: Tensor, centres: Tensor, window: float = 8.0, size: int = 16) -> Tensor:
    """Windows (N, 1, size, size) of `window` pixels around `centres` (N, 2) of frames (N, H, W), resampled
    bilinearly (what the digit classifier takes: an 8×8 digit upsampled to 16×16, centred). Differentiable
    in the frames; the centres only place the windows."""
    n, h, w = frames.shape
    c = centres.detach()
    # output pixel k samples frame coordinate centre − window/2 + (k + 0.5)·window/size (pixel centres
    # at integers): for an 8-pixel digit centred at `centre` this is the classifier's own 8 → 16 upsampling
    k = (torch.arange(size, dtype=frames.dtype, device=frames.device) + 0.5) * (window / size)
    rows = c[:, :1] - window / 2 + k[None, :]
    cols = c[:, 1:] - window / 2 + k[None, :]
    gy = (2 * rows / (h - 1) - 1)[:, :, None].expand(-1, -1, size)
    gx = (2 * cols / (w - 1) - 1)[:, None, :].expand(-1, size, -1)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(frames[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def motion_magnitude(centres: Tensor) -> Tensor:
    """Mean displacement per frame (B,) in pixels of centre trajectories (B, F, 2)."""
    if centres.shape[1] < 2:
        return torch.zeros(centres.shape[0], device=centres.device)
    return (centres[:, 1:] - centres[:, :-1]).norm(dim=-1).mean(dim=1)


def _digits(conditions: list[MotionCondition], who: str, device: Any) -> Tensor:
    bad = [c.text() for c in conditions if c.digit is None][:3]
    if bad:
        raise ValueError(f"{who}: every prompt must name a digit; these do not: {bad}")
    return torch.tensor([c.digit for c in conditions], dtype=torch.long, device=device)


def _load_digit_classifier(weights: str | None) -> Any:
    from diffalign.modalities.image.train_digit_classifier import CLASSIFIER_WEIGHTS, load_classifier

    return load_classifier(weights or CLASSIFIER_WEIGHTS)


class FrameDigitFidelity(Reward):
    """Per-frame probability of the prompted digit under the image digit classifier (differentiable).

    Scores are per frame (B, F') and reduce by `aggregate` ("mean" or "min": the worst frame); the per
    frame scores are kept (`RewardOutput.elements`, logged as `reward/element_j`).

    Args:
        frames: which frames to decode and score (`modalities.video.frames`): "random" (one per clip, the
            cheapest), an int k (every k-th), "first_middle_last", "all" or a list of indices.
        aggregate: "mean" or "min" over the scored frames.
        weights: the digit classifier (default the image modality's shipped one).
        log_prob: score log-probabilities instead of probabilities.
        window: side in pixels of the centred window the classifier sees (8: the digits' size).
    """

    reader = CLIP_READER

    differentiable = True

    def __init__(
        self,
        frames: Any = "all",
        aggregate: Literal["mean", "min"] = "mean",
        weights: str | None = None,
        log_prob: bool = False,
        window: float = 8.0,
        name: str = "frame_digit_fidelity",
    ) -> None:
        super().__init__(name, {"frames": frames})
        if aggregate not in ("mean", "min"):
            raise ValueError(f"aggregate must be 'mean' or 'min', got {aggregate!r}")
        self.reduction = aggregate
        self.classifier = _load_digit_classifier(weights)
        self.log_prob, self.window = log_prob, window

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        clips = _check_clips(samples, self.name)
        b, f = clips.shape[:2]
        digit = _digits(parse_conditions(cond.get("prompt"), b, self.name), self.name, clips.device)
        frames = gray_frames(clips).reshape(b * f, *clips.shape[-2:])
        crops = centred_windows(frames, ink_centres(frames), self.window)
        self.classifier.to(clips.device)
        logp = self.classifier(crops).log_softmax(-1).reshape(b, f, -1)
        chosen = logp.gather(2, digit[:, None, None].expand(b, f, 1))[..., 0]
        scores = chosen if self.log_prob else chosen.exp()
        accuracy = (logp.argmax(-1) == digit[:, None]).float().mean(1).detach()
        return RewardOutput(scores=scores, info={"digit_accuracy": accuracy})


class FrameImageReward(Reward):
    """An image reward scored on the frames of clips: each selected frame is one image (the image sample
    layout (N, 3, H, W) in [0, 1]) with its clip's condition; per-frame scores (B, F') reduce by
    `aggregate`. Differentiable when the image reward is. Per-image `info` entries are averaged per clip.

    Args:
        reward: the image reward (e.g. `rewards.image_models.LaionAesthetic` from local weights).
        frames: which frames to decode and score (default one random frame per clip: VADER's cheapest).
        aggregate: "mean" or "min" over the scored frames.
    """

    reader = CLIP_READER

    def __init__(
        self,
        reward: Reward,
        frames: Any = "random",
        aggregate: Literal["mean", "min"] = "mean",
        name: str | None = None,
    ) -> None:
        super().__init__(name or f"{reward.name}_frames", {"frames": frames})
        if aggregate not in ("mean", "min"):
            raise ValueError(f"aggregate must be 'mean' or 'min', got {aggregate!r}")
        self.image_reward = reward
        self.reduction = aggregate
        self.differentiable = reward.differentiable

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        clips = _check_clips(samples, self.name)
        b, f = clips.shape[:2]
        images = rearrange(clips, "b f c h w -> (b f) c h w")
        out = self.image_reward(images, cond.repeat_interleave(f))
        scores = rearrange(out.scores, "(b f) -> b f", b=b)
        info = {
            k: rearrange(torch.as_tensor(v).float(), "(b f) -> b f", b=b).mean(1)
            for k, v in out.info.items()
            if torch.as_tensor(v).dim() == 1 and len(v) == b * f
        }
        return RewardOutput(scores=scores, info=info)


class TemporalFlicker(Reward):
    """VBench's temporal flickering score, 1 − mean |frame_t − frame_{t+1}| over pixels and frame pairs
    (1 for a static clip; differentiable). `info["motion_px"]`: centre-of-mass motion per frame."""

    reader = CLIP_READER

    differentiable = True

    def __init__(self, name: str = "temporal_flicker") -> None:
        super().__init__(name, {"frames": "all"})

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        frames = gray_frames(_check_clips(samples, self.name))
        if frames.shape[1] < 2:
            raise ValueError(f"{self.name} needs clips of at least 2 frames, got {frames.shape[1]}")
        diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3))
        return RewardOutput(
            scores=1 - diff, info={"motion_px": motion_magnitude(ink_centres(frames)).detach()}
        )


class SubjectConsistency(Reward):
    """VBench's subject consistency: mean over t ≥ 1 of ½·(cos(f_t, f_0) + cos(f_t, f_{t−1})), f the digit
    classifier's penultimate features (64) of each frame's centred window (so a digit that moves but
    keeps its identity and shape scores high). Differentiable.

    Args:
        weights: the digit classifier (default the image modality's shipped one).
        window: side of the centred window in pixels.
    """

    reader = CLIP_READER

    differentiable = True

    def __init__(
        self, weights: str | None = None, window: float = 8.0, name: str = "subject_consistency"
    ) -> None:
        super().__init__(name, {"frames": "all"})
        self.classifier = _load_digit_classifier(weights)
        self.window = window

    def features(self, frames: Tensor) -> Tensor:
        """(N, H, W) frames → (N, 64) features of their centred windows."""
        crops = centred_windows(frames, ink_centres(frames), self.window)
        c = self.classifier.to(frames.device)
        x = crops.float() * 2 - 1  # the classifier's own input scaling
        head = c.head[:-1]  # Flatten, Linear, ReLU: the layer before the logits
        return head(c.features(x))

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        frames = gray_frames(_check_clips(samples, self.name))
        b, f = frames.shape[:2]
        if f < 2:
            raise ValueError(f"{self.name} needs clips of at least 2 frames, got {f}")
        feats = self.features(frames.reshape(b * f, *frames.shape[-2:])).reshape(b, f, -1)
        to_first = F.cosine_similarity(feats[:, 1:], feats[:, :1].expand(-1, f - 1, -1), dim=-1, eps=1e-6)
        to_prev = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1, eps=1e-6)
        scores = (0.5 * (to_first + to_prev)).mean(dim=1)
        return RewardOutput(scores=scores, info={"motion_px": motion_magnitude(ink_centres(frames)).detach()})


def ideal_trajectories(
    start: Tensor, conditions: list[MotionCondition], num_frames: int, frame_size: int
) -> Tensor:
    """(B, F, 2) centre trajectories of the prompted motions from `start` (B, 2), bouncing off the data's
    walls (`modalities.video.data.com_walls`)."""
    from diffalign.modalities.video.data import bouncing_trajectory, com_walls

    velocity = torch.tensor([c.velocity for c in conditions], dtype=start.dtype, device=start.device)
    return bouncing_trajectory(start, velocity, num_frames, com_walls(frame_size))


class MotionAgreement(Reward):
    """How closely each clip's centre of mass follows its prompted direction and speed (differentiable).

    c_t is the ink's centre of mass in frame t; c*_t the ideal trajectory: from c_0, `SPEED_PIXELS`
    pixels per frame in the prompted direction, bouncing off the walls `COM_WALLS` on both axes (the
    moving-digit data's physics). Score = mean over t ≥ 1 of exp(−‖c_t − c*_t‖² / 2σ²), in (0, 1].
    Logs `motion_px` (mean displacement per frame) and `com_error_px` (mean ‖c_t − c*_t‖).

    Args:
        sigma: σ in pixels (1: a one-pixel miss costs 39 % of a frame's score).
        floor: intensities up to this count as background when locating the digit (`ink_centres`).
    """

    reader = CLIP_READER

    differentiable = True

    def __init__(self, sigma: float = 1.0, floor: float = INK_FLOOR, name: str = "motion_agreement") -> None:
        super().__init__(name, {"frames": "all"})
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.floor = sigma, floor

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        frames = gray_frames(_check_clips(samples, self.name))
        b, f, h, w = frames.shape
        if h != w:
            raise ValueError(f"{self.name} expects square frames, got {h}×{w}")
        conditions = parse_conditions(cond.get("prompt"), b, self.name)
        open_ = [c.text() for c in conditions if c.velocity is None][:3]
        if open_:
            raise ValueError(
                f"{self.name}: every prompt must name a direction and a speed; these do not: {open_}"
            )
        centres = ink_centres(frames, self.floor)
        ideal = ideal_trajectories(centres[:, 0], conditions, f, h)
        err = (centres[:, 1:] - ideal[:, 1:]).norm(dim=-1)
        scores = torch.exp(-(err**2) / (2 * self.sigma**2)).mean(dim=1)
        info = {"motion_px": motion_magnitude(centres).detach(), "com_error_px": err.mean(1).detach()}
        return RewardOutput(scores=scores, info=info)


class MotionClassifierReward(Reward):
    """Probability the in-project motion classifier gives each clip's prompted (direction, speed)
    (differentiable); `info["motion_accuracy"]`: the classifier's top class is the prompted one.

    Args:
        weights: the classifier (default the shipped one, `train_motion_classifier.py`).
        log_prob: score log-probabilities instead.
    """

    reader = CLIP_READER

    differentiable = True

    def __init__(
        self, weights: str | None = None, log_prob: bool = False, name: str = "motion_classifier"
    ) -> None:
        super().__init__(name, {"frames": "all"})
        from diffalign.modalities.video.train_motion_classifier import (
            CLASSIFIER_WEIGHTS,
            load_motion_classifier,
        )

        self.classifier = load_motion_classifier(weights or CLASSIFIER_WEIGHTS)
        self.log_prob = log_prob

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        from diffalign.modalities.video.train_motion_classifier import motion_class

        clips = _check_clips(samples, self.name)
        conditions = parse_conditions(cond.get("prompt"), clips.shape[0], self.name)
        open_ = [c.text() for c in conditions if c.velocity is None][:3]
        if open_:
            raise ValueError(
                f"{self.name}: every prompt must name a direction and a speed; these do not: {open_}"
            )
        target = torch.tensor([motion_class(c) for c in conditions], device=clips.device)
        self.classifier.to(clips.device)
        logp = self.classifier(clips).log_softmax(-1)
        chosen = logp.gather(1, target[:, None])[:, 0]
        correct = (logp.argmax(-1) == target).float().detach()
        return RewardOutput(
            scores=chosen if self.log_prob else chosen.exp(), info={"motion_accuracy": correct}
        )
