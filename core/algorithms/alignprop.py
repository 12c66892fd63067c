"""AlignProp: reward backpropagation with randomised truncation and activation checkpointing.

Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
arXiv:2310.03739. Like DRaFT-K, but the number K of denoiser calls kept in the graph is drawn afresh
for every update, uniformly in [`k_min`, `k_max`] (AlignProp samples the truncation point b ∈ [1, T)
and back-propagates through the last T − b calls). Memory stays bounded by checkpointing each kept
call: set `gradient_checkpointing: true` on the policy (recipes do).
"""

from __future__ import annotations

import torch

from diffalign.core.algorithms.draft import DRaFT
from diffalign.core.policy import DiffusionPolicy


class AlignProp(DRaFT):
    """Reward backprop through a random number of final steps.

    Args:
        k_min: fewest denoiser calls kept in the graph.
        k_max: most (None: all T steps).
        reward_scale: the loss is −reward_scale·mean(reward) (AlignProp uses 0.01 for aesthetics).
    """

    def __init__(self, k_min: int = 1, k_max: int | None = None, reward_scale: float = 1.0) -> None:
        if k_min < 1:
            raise ValueError(f"k_min must be >= 1 (K = 0 would keep no graph to back-propagate), got {k_min}")
        super().__init__(k=k_min, lv_samples=0, reward_scale=reward_scale)
        if k_max is not None and k_max < k_min:
            raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")
        self.k_min, self.k_max = k_min, k_max

    def grad_steps(self, policy: DiffusionPolicy, generator: torch.Generator) -> int:
        hi = min(self.k_max or policy.num_steps, policy.num_steps)
        lo = min(self.k_min, hi)
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))
