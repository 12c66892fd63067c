"""The shipped digit model and classifier: they load, and the model follows prompts — imperfectly.

Measured with the shipped classifier on 10 prompts × 10 seeds, sampled like the recipes sample
(DDIM η = 1, 10 steps, no guidance). The bounds are honest: better than chance (10 %), short of
perfect, so alignment has room (see docs/modalities/image.md for the figures).
"""

import json
from pathlib import Path

import torch

from diffalign.core.kernels import DDIMKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.image import DIGIT_PROMPTS, ImageBackbone, load_digit_images
from diffalign.modalities.image.train_digit_classifier import load_classifier
from diffalign.rewards.image import DigitFidelity

LOW, HIGH = 0.15, 0.6  # measured 0.27 (chance 0.10) with the shipped weights
HERE = Path(__file__).resolve().parents[3] / "modalities" / "image"


def test_shipped_classifier_is_accurate_on_heldout_digits():
    x, y = load_digit_images(16, "test")
    acc = (load_classifier()(x).argmax(-1) == y).float().mean().item()
    report = json.loads((HERE / "digit_classifier.json").read_text())
    assert acc > 0.95 and abs(acc - report["heldout_accuracy"]) < 1e-3


def test_shipped_base_model_follows_prompts_imperfectly():
    backbone = ImageBackbone()  # the default config loads digits_base.safetensors
    policy = DiffusionPolicy(backbone, DDIMKernel(eta=1.0), num_steps=10).eval()
    prompts = [p for p in DIGIT_PROMPTS for _ in range(10)]
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
    cond = backbone.encode_condition({"prompt": prompts})
    with torch.no_grad():
        images = backbone.decode(policy.rollout(cond, generator=gens).x0)
    out = DigitFidelity()(images, cond)
    agreement = out.info["digit_accuracy"].mean().item()
    assert LOW <= agreement <= HIGH, f"prompt-following rate {agreement:.2f} outside [{LOW}, {HIGH}]"
    # unconditional samples (empty prompt) match a prompt no better than conditional ones
    null = backbone.null_condition(cond)
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
        uncond = backbone.decode(policy.rollout(null, generator=gens).x0)
    assert DigitFidelity()(uncond, cond).info["digit_accuracy"].mean().item() < agreement
