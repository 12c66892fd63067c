"""DPOK: policy gradient with a KL penalty to the pretrained model.

Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
arXiv:2305.16381. The paper regularises the policy gradient with the per-step KL between the policy's
and the pretrained model's Gaussian transitions. Here that KL is computed in closed form,
‖μ_θ − μ_ref‖²/(2σ²) for the two steps of equal std σ (not the Categorical-over-log-probs quirk of one
public re-implementation), on top of DDPO's clipped importance-sampled objective:

    loss = mean(max(−A·ρ, −A·clip(ρ, 1 ± ε))) + β · mean_t KL_t

The reference is the frozen initial model (`Backbone.reference()`: adapters disabled for LoRA
backbones, else a frozen copy taken before training). Logs `kl` and `policy_loss` besides DDPO's terms.
"""

from __future__ import annotations

from typing import Literal

from diffalign.core.algorithms.ddpo import DDPO


class DPOK(DDPO):
    """DDPO plus β·KL(π_θ ‖ π_pretrained) per step; see `DDPO` for the shared arguments.

    Args:
        kl_coef: β, the weight of the KL penalty (must be > 0).
    """

    def __init__(
        self,
        kl_coef: float = 0.01,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantages: Literal["per_prompt", "batch"] = "per_prompt",
        per_prompt_buffer: int = 32,
        per_prompt_min_count: int = 16,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
    ) -> None:
        if kl_coef <= 0:
            raise ValueError(f"DPOK needs kl_coef > 0 (use DDPO for none), got {kl_coef}")
        super().__init__(
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            advantages=advantages,
            per_prompt_buffer=per_prompt_buffer,
            per_prompt_min_count=per_prompt_min_count,
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
            train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            kl_coef=kl_coef,
        )
