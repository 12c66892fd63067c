"""AlignProp: reward backpropagation with randomised truncation and activation checkpointing.

Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
arXiv:2310.03739. Sample with the graph kept through the last K denoiser calls, decode, score, and
minimise −scale·mean(r) — where K is drawn afresh for every update, uniformly in [`k_min`, `k_max`]
(AlignProp samples the truncation point b ∈ [1, T) and back-propagates through the last T − b calls).
Memory stays bounded by checkpointing each kept call: set `gradient_checkpointing: true` on the policy
(recipes do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward_backprop import backprop_batch, reward_loss
from diffalign.core.rollouts import AlignContext
from diffalign.core.sampling import sample_batch
from diffalign.core.types import Batch


class AlignProp(Algorithm):
    """Reward backprop through a random number of final steps.

    Args:
        k_min: fewest denoiser calls kept in the graph.
        k_max: most (None: all T steps).
        reward_scale: the loss is −reward_scale·mean(reward) (AlignProp uses 0.01 for aesthetics).
    """

    needs_differentiable_reward = True

    def __init__(self, k_min: int = 1, k_max: int | None = None, reward_scale: float = 1.0) -> None:
        super().__init__()
        if k_min < 1:
            raise ValueError(f"k_min must be >= 1 (K = 0 would keep no graph to back-propagate), got {k_min}")
        if k_max is not None and k_max < k_min:
            raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")
        self.k_min, self.k_max, self.reward_scale = k_min, k_max, reward_scale

    def grad_steps(self, policy: DiffusionPolicy, generator: torch.Generator) -> int:
        """K for this update, uniform in [k_min, min(k_max, T)]."""
        hi = min(self.k_max or policy.num_steps, policy.num_steps)
        lo = min(self.k_min, hi)
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        return backprop_batch(ctx, batch), {}

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        k = self.grad_steps(policy, micro.generator)
        sampled = sample_batch(policy, micro.cond, micro.seed.tolist(), grad_steps=k)
        out = reward_loss(policy, micro.reward, sampled.x0, sampled.mask, sampled.cond, self.reward_scale)
        out["grad_steps"] = torch.tensor(float(k))
        return out
