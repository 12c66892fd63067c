"""Rewards for images in the image modality's sample layout: float (B, 3, H, W) in [0, 1].

- `JpegCompressibility` / `JpegIncompressibility`: DDPO's tasks, −/+ JPEG size in kB at a fixed
  quality (PIL; not differentiable).
- `DigitFidelity`: probability the shipped digit classifier gives the digit the prompt asks for
  (differentiable). The digit comes from `cond["digit"]`, which `ImageBackbone.encode_condition` fills
  from prompts like "a handwritten 7".
- `Brightness`: −(mean intensity − target)², a differentiable test reward.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond


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

    The requested digit is `cond["digit"]` (B,) — `ImageBackbone.encode_condition` sets it from the
    prompt ("a handwritten 7" → 7). Rows asking for no digit (−1) raise, since their score is undefined.

    Args:
        weights: classifier weights (path or pkg:// spec; default the shipped classifier trained by
            `python -m diffalign.modalities.image.train_digit_classifier`).
        log_prob: score with the log-probability instead of the probability.
    """

    differentiable = True

    def __init__(self, weights: str | None = None, log_prob: bool = False) -> None:
        super().__init__("digit_fidelity")
        from diffalign.modalities.image.train_digit_classifier import CLASSIFIER_WEIGHTS, load_classifier

        self.classifier = load_classifier(weights or CLASSIFIER_WEIGHTS)
        self.log_prob = log_prob

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        _check_images(samples, self.name)
        if "digit" not in cond:
            raise KeyError(
                "DigitFidelity needs the requested digit under cond['digit'] (ImageBackbone.encode_condition "
                f"sets it from prompts like 'a handwritten 7'); cond has keys {sorted(cond)}"
            )
        digit = cond["digit"].to(samples.device).long().reshape(-1)
        if (digit < 0).any() or (digit > 9).any():
            bad = digit[(digit < 0) | (digit > 9)].tolist()
            raise ValueError(f"DigitFidelity: prompts must name a digit 0-9; got digit ids {bad}")
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
