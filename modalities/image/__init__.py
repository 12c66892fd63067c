"""Image modality: a text-conditioned diffusers UNet in pixel or latent space, and handwritten digits.

Sample layout (what `decode` returns, what image rewards take): float tensor (B, 3, H, W) in [0, 1],
RGB (grayscale digits are repeated to 3 channels). Condition: a prompt string, e.g. "a handwritten 7",
encoded offline by `PromptConditioner` (no tokenizer download). `StableDiffusionBackbone` runs the same
recipes at full size from a local diffusers folder (LoRA through peft). Image folders for
`diffalign score`: `io.py`.

The names below are imported on first use (Stable Diffusion pulls in transformers; the backbone and
data pull in diffusers and Lightning, which `diffalign.modalities.image.io` does not need).
"""

import importlib
from typing import Any

_LAZY = {
    "BASE_WEIGHTS": "diffalign.modalities.image.backbone",
    "DIGITS_CONFIG": "diffalign.modalities.image.backbone",
    "FLOW_BASE_WEIGHTS": "diffalign.modalities.image.backbone",
    "ImageBackbone": "diffalign.modalities.image.backbone",
    "digits_backbone": "diffalign.modalities.image.backbone",
    "from_sample_layout": "diffalign.modalities.image.backbone",
    "to_sample_layout": "diffalign.modalities.image.backbone",
    "DIGIT_PROMPTS": "diffalign.modalities.image.conditioning",
    "VOCABULARY": "diffalign.modalities.image.conditioning",
    "PromptConditioner": "diffalign.modalities.image.conditioning",
    "digit_prompt": "diffalign.modalities.image.conditioning",
    "DigitsDataModule": "diffalign.modalities.image.data",
    "load_digit_images": "diffalign.modalities.image.data",
    "StableDiffusionBackbone": "diffalign.modalities.image.stable_diffusion",
    "make_tiny_sd_pipeline": "diffalign.modalities.image.stable_diffusion",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign.modalities.image' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
