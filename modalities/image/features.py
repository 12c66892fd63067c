"""Feature spaces of the digit images for the evaluation's diversity guard (`core.guards`).

`digit_features(samples, cond)`: the shipped digit classifier's penultimate activations (64 ReLU units
after its convolutional trunk), a semantic space where two drawings of the same digit in different
styles are apart and one blob copied over every seed is a single point. Name it in a recipe:
`RewardEvaluation(features: diffalign.modalities.image.features.digit_features)`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.modalities.image.train_digit_classifier import (
    CLASSIFIER_WEIGHTS,
    DigitClassifier,
    load_classifier,
)


@lru_cache(maxsize=2)
def _classifier(weights: str) -> DigitClassifier:
    return load_classifier(weights)


@torch.no_grad()
def digit_features(samples: Tensor, cond: Any = None, weights: str = CLASSIFIER_WEIGHTS) -> Tensor:
    """(B, 64) penultimate features of the digit classifier for images (B, 3|1, H, W) in [0, 1]."""
    if not isinstance(samples, Tensor) or samples.dim() != 4:
        raise ValueError(
            f"digit_features expects images (B, 3, H, W) in [0, 1], got {type(samples).__name__}"
        )
    model = _classifier(weights).to(samples.device)
    x = samples.float().mean(1, keepdim=True)
    size = (model.image_size, model.image_size)
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return model.head[:3](model.features(x * 2 - 1))
