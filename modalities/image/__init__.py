"""Image modality: a text-conditioned diffusers UNet in pixel or latent space, and handwritten digits.

Sample layout (what `decode` returns, what image rewards take): float tensor (B, 3, H, W) in [0, 1],
RGB (grayscale digits are repeated to 3 channels). Condition: a prompt string, e.g. "a handwritten 7",
encoded offline by `PromptConditioner` (no tokenizer download). `StableDiffusionBackbone` runs the same
recipes at full size from a local diffusers folder (LoRA through peft).
"""

from diffalign.modalities.image.backbone import (
    BASE_WEIGHTS,
    DIGITS_CONFIG,
    FLOW_BASE_WEIGHTS,
    ImageBackbone,
    digits_backbone,
    from_sample_layout,
    to_sample_layout,
)
from diffalign.modalities.image.conditioning import DIGIT_PROMPTS, VOCABULARY, PromptConditioner, digit_prompt
from diffalign.modalities.image.data import DigitsDataModule, load_digit_images

_LAZY = {  # Stable Diffusion pulls in transformers: imported on first use only
    "StableDiffusionBackbone": "diffalign.modalities.image.stable_diffusion",
    "make_tiny_sd_pipeline": "diffalign.modalities.image.stable_diffusion",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign.modalities.image' has no attribute {name!r}")


__all__ = [
    "BASE_WEIGHTS",
    "FLOW_BASE_WEIGHTS",
    "DIGITS_CONFIG",
    "DIGIT_PROMPTS",
    "VOCABULARY",
    "DigitsDataModule",
    "ImageBackbone",
    "PromptConditioner",
    "StableDiffusionBackbone",
    "make_tiny_sd_pipeline",
    "digit_prompt",
    "digits_backbone",
    "from_sample_layout",
    "load_digit_images",
    "to_sample_layout",
]
