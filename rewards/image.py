"""Rewards for images in the image modality's sample layout: float (B, 3, H, W) in [0, 1].

- `JpegCompressibility` / `JpegIncompressibility`: DDPO's tasks, −/+ JPEG size in kB at a fixed
  quality (PIL; not differentiable).
- `TargetColor`: −mean squared distance of every pixel to one RGB colour (differentiable; a toy task
  for reward backpropagation).
- `DigitFidelity`: probability the shipped digit classifier gives the digit the prompt asks for
  (differentiable). The digit is read from the prompt text `cond["prompt"]` ("a handwritten 7" or
  "... seven" → 7; a prompt dict's `digit`; an int digit id).
- `Brightness`: −(mean intensity − target)², a differentiable test reward.
- `DigitRealism`: the evaluation's held-out "gold" reward: closeness to a real held-out digit of the
  prompted class in pixel space (no classifier involved).
- `DigitScorer`: a small CNN scoring an image *for the digit its prompt asks for*, the network of a
  digit reward model learned from preferences (`RewardModelModule`); `LearnedReward` (core) loads its
  exported weights as a reward and hands it the prompts.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.core.reward import LearnedReward, Reward, RewardOutput
from diffalign.core.types import Cond

#: the reader of image files for `diffalign score` (every reward here declares it)
IMAGE_READER = "diffalign.modalities.image.io.ImageReader"


def _check_images(samples: Tensor, who: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() != 4 or samples.shape[1] not in (1, 3):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"{who} expects images (B, 3, H, W) in [0, 1], got {shape}")
    return samples


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG size in kB (1 kB = 1000 bytes) of each image (B, 3|1, H, W) in [0, 1] at `quality`."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = arr.permute(0, 2, 3, 1).numpy()
    sizes = []
    for a in arr:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """−(JPEG size in kB) at a fixed quality: smaller files score higher (DDPO's compressibility).

    Args:
        quality: JPEG quality (DDPO uses 95).
    """

    reader = IMAGE_READER

    def __init__(self, quality: int = 95) -> None:
        super().__init__("jpeg_compressibility")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = quality

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        size = jpeg_sizes_kb(_check_images(samples, self.name), self.quality).to(samples.device)
        return RewardOutput(scores=-size, info={"jpeg_kb": size})


class JpegIncompressibility(JpegCompressibility):
    """+(JPEG size in kB) at a fixed quality: larger files score higher (DDPO's incompressibility)."""

    def __init__(self, quality: int = 95) -> None:
        super().__init__(quality)
        self._name = "jpeg_incompressibility"

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        out = super().forward(samples, cond)
        return RewardOutput(scores=-out.scores, info=out.info)


class DigitFidelity(Reward):
    """Probability the digit classifier assigns to the requested digit (differentiable).

    The requested digit is read from each row's prompt, `cond["prompt"]` ("a handwritten 7" → 7; see
    `prompted_digits`). Rows asking for no digit raise, since their score is undefined.

    Args:
        weights: classifier weights (path or pkg:// spec; default the shipped classifier trained by
            `python -m diffalign.modalities.image.train_digit_classifier`).
        log_prob: score with the log-probability instead of the probability.
    """

    reader = IMAGE_READER

    differentiable = True

    def __init__(self, weights: str | None = None, log_prob: bool = False) -> None:
        super().__init__("digit_fidelity")
        from diffalign.modalities.image.train_digit_classifier import CLASSIFIER_WEIGHTS, load_classifier

        self.classifier = load_classifier(weights or CLASSIFIER_WEIGHTS)
        self.log_prob = log_prob

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        _check_images(samples, self.name)
        digit = prompted_digits(cond.get("prompt"), samples.shape[0], samples.device, self.name)
        self.classifier.to(samples.device)
        logp = self.classifier(samples).log_softmax(-1)
        chosen = logp.gather(1, digit[:, None])[:, 0]
        scores = chosen if self.log_prob else chosen.exp()
        correct = (logp.argmax(-1) == digit).float().detach()
        return RewardOutput(scores=scores, info={"digit_accuracy": correct})


class Brightness(Reward):
    """−(mean intensity − target)² per image, optionally per RGB channel target (differentiable).

    Args:
        target: the wanted mean intensity in [0, 1], one value or one per channel.
    """

    reader = IMAGE_READER

    differentiable = True

    def __init__(self, target: float | list[float] = 1.0) -> None:
        super().__init__("brightness")
        t = torch.as_tensor(target, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, 3):
            raise ValueError(f"target must be one value or one per RGB channel, got {target}")
        self.register_buffer("target", t, persistent=False)

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        x = _check_images(samples, self.name).float()
        mean = x.mean(dim=(2, 3))  # (B, C)
        err = (mean - self.target.to(x.device)) ** 2
        return RewardOutput(scores=-err.mean(-1), info={"mean_intensity": mean.mean(-1).detach()})


class DigitRealism(Reward):
    """A held-out "gold" reward for the digit task: how close an image is to a real handwritten digit of the
    prompted class, judged without the classifier that `DigitFidelity` uses.

    score = exp(−d² / (2s²)), d the pixel-space (16×16 gray) distance to the nearest real digit of the
    prompted class among the digits held out from the base model's and the classifier's training (the
    seeded 20 % split of `load_digit_images`, 359 images), s the median distance from a held-out real
    digit to its nearest training digit (the spread of real handwriting). A real-looking drawing of the
    digit scores near 1; a blob that fools the classifier, or a drawing of another digit, scores low. Not
    differentiable (a nearest-neighbour lookup); meant for evaluation (`RewardEvaluation(gold_reward=...)`).
    """

    def __init__(self) -> None:
        super().__init__("digit_realism")
        from diffalign.modalities.image.data import load_digit_images

        ref_x, ref_y = load_digit_images(16, split="test")
        train_x, _ = load_digit_images(16, split="train")
        ref = ref_x.reshape(len(ref_x), -1)
        scale = torch.cdist(ref, train_x.reshape(len(train_x), -1)).min(1).values.median()
        self.register_buffer("reference", ref, persistent=False)
        self.register_buffer("labels", ref_y, persistent=False)
        self.scale = float(scale)

    @torch.no_grad()
    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        x = _check_images(samples, self.name).float().mean(1, keepdim=True)
        if x.shape[-2:] != (16, 16):
            x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        digit = prompted_digits(cond.get("prompt"), x.shape[0], None, self.name)
        d = torch.cdist(x.reshape(len(x), -1).cpu(), self.reference.cpu())
        same = torch.where(self.labels[None, :] == digit[:, None], d, torch.full_like(d, float("inf")))
        nearest = same.min(1).values
        scores = torch.exp(-(nearest**2) / (2 * self.scale**2))
        return RewardOutput(scores=scores.to(samples.device), info={"nearest_real_distance": nearest})


class TargetColor(Reward):
    """−mean over pixels and channels of (x − rgb)² (maximum 0; differentiable): every pixel pulled towards
    one colour. The `target_color` reward of the TRL peer harness (`benchmarks/peer/peer_common.py`), used
    by `benchmarks/sd_gpu.py` to run AlignProp on the same workload as TRL.

    Args:
        rgb: the target colour, three values in [0, 1].
    """

    differentiable = True

    def __init__(self, rgb: list[float] | tuple[float, float, float] = (0.9, 0.1, 0.1)) -> None:
        super().__init__("target_color")
        t = torch.as_tensor(list(rgb), dtype=torch.float32)
        if t.shape != (3,) or not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"rgb must be three values in [0, 1], got {rgb}")
        self.register_buffer("rgb", t.view(1, 3, 1, 1), persistent=False)

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        x = _check_images(samples, self.name).float()
        if x.shape[1] != 3:
            raise ValueError(f"{self.name} expects RGB images (B, 3, H, W), got {tuple(x.shape)}")
        return RewardOutput(scores=-((x - self.rgb.to(x.device)) ** 2).mean(dim=(1, 2, 3)))


def _digit_of(prompt: Any) -> int:
    if isinstance(prompt, Mapping):
        if "digit" not in prompt:
            raise KeyError(f"a prompt dict needs 'digit'; it has keys {sorted(prompt)}")
        return int(prompt["digit"])
    if isinstance(prompt, int):
        return prompt
    from diffalign.modalities.image.conditioning import prompt_digit

    return prompt_digit(str(prompt))


def prompted_digits(
    prompts: Any, batch_size: int, device: torch.device | None = None, who: str = "DigitScorer"
) -> Tensor:
    """The digit (B,) long each row asks for: from prompt strings ("a handwritten 7" or "... seven"),
    digit ids (ints or a tensor), or prompt dicts with a `digit` entry."""
    if prompts is None:
        raise ValueError(
            f"{who} needs the prompts of the images it scores (cond['prompt']: strings such as "
            "'a handwritten 7', digit ids, or dicts with 'digit')"
        )
    if isinstance(prompts, Tensor):
        digit = prompts.reshape(-1).long()
    elif isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list (one per image), got {type(prompts).__name__}")
    else:
        digit = torch.tensor([_digit_of(p) for p in prompts], dtype=torch.long)
    if digit.numel() != batch_size:
        raise ValueError(f"{who}: got {digit.numel()} prompts for {batch_size} images")
    if (digit < 0).any() or (digit > 9).any():
        bad = [p for p, d in zip(list(prompts), digit.tolist(), strict=False) if not 0 <= d <= 9][:3]
        raise ValueError(f"{who}: every prompt must name a digit 0-9; these do not: {bad}")
    return digit.to(device) if device is not None else digit


class DigitScorer(nn.Module):
    """A small CNN (about 19 k parameters) scoring images given the digit their prompt asks for.

    A conv trunk (16 → 32 → 32 channels, two stride-2 steps, 4×4 average pool) ends in 10 logits, one
    per digit; the score of an image is the logit of its prompted digit. It knows nothing about digits
    until trained on preferences (`RewardModelModule`, e.g. recipes/image/reward_model_digits.yaml).

    `forward(samples, prompts)`: samples float (B, 3, H, W) or (B, 1, H, W) in [0, 1] (RGB is averaged
    to gray); prompts a list of prompt strings, digit ids or prompt dicts with `digit`, or a (B,) digit
    tensor. Returns scores (B,).

    Args:
        width: channels of the first conv (the others use 2× width).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width * 16, 10)

    def logits(self, samples: Tensor) -> Tensor:
        """Per-digit scores (B, 10)."""
        x = _check_images(samples, "DigitScorer").float().mean(1, keepdim=True)
        return self.head(self.trunk(x * 2 - 1))

    def forward(self, samples: Tensor, prompts: Any = None) -> Tensor:
        digit = prompted_digits(prompts, samples.shape[0], samples.device)
        return self.logits(samples).gather(1, digit[:, None])[:, 0]


class LearnedDigitReward(LearnedReward):
    """`core.reward_model.LearnedReward` with a `DigitScorer` network by default: a preference-trained
    digit reward model as a reward (frozen, differentiable). The network reads the requested digit from
    the prompts (`cond["prompt"]`).

    Args:
        weights: the exported safetensors (`RewardModelModule`'s `export_path`).
        network: the trained architecture (default `DigitScorer()`).
        name: reward name for logs.
    """

    reader = IMAGE_READER

    def __init__(
        self, weights: str, network: nn.Module | None = None, name: str = "learned_digit_reward"
    ) -> None:
        super().__init__(network if network is not None else DigitScorer(), weights, name)
