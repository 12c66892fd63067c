"""AlignProp: reward backpropagation with randomised truncation and activation checkpointing.

Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
arXiv:2310.03739. Sample with the graph kept through the last K denoiser calls, decode, score, and
minimise −scale·mean(r), with the truncation drawn afresh for every update. AlignProp's code
(`sd_pipeline.py`, `backprop_strategy`) draws the step b ∈ [1, T) from which gradients flow — the calls
b … T−1 keep their graph, so K = T − b — by rejection until 1 ≤ b < T:

- "gaussian": b = ⌊N(mean, std)⌋ (the paper's default, mean 42, std 5 of T = 50: K ≈ 8 ± 5);
- "uniform": b uniform in [min, max) (`backprop_kwargs` {min: 0, max: 50});
- "fixed": b = value (49 of 50: K = 1, DRaFT-1);
- "k_range" (this project's earlier parameterisation, the default): K uniform in [k_min, k_max].

With AlignProp's strategies K never reaches T (b ≥ 1). Memory stays bounded by checkpointing each kept
call: set `gradient_checkpointing: true` on the policy (recipes do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

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
        k_min: fewest denoiser calls kept in the graph ("k_range").
        k_max: most (None: all T steps; "k_range").
        reward_scale: the loss is −reward_scale·mean(reward) (AlignProp uses 0.01 for aesthetics).
        backprop_strategy: "k_range", or AlignProp's "gaussian", "uniform", "fixed" (module docstring).
        backprop_kwargs: the strategy's parameters, in denoising-step indices b of the T-step schedule:
            gaussian {mean, std}, uniform {min, max} (max exclusive), fixed {value}. Default: the paper's
            values scaled from T = 50 to the policy's T (gaussian mean 0.84·T, std 0.1·T; uniform [0, T);
            fixed T − 1).
    """

    needs_differentiable_reward = True
    STRATEGIES = ("k_range", "gaussian", "uniform", "fixed")

    def __init__(
        self,
        k_min: int = 1,
        k_max: int | None = None,
        reward_scale: float = 1.0,
        backprop_strategy: Literal["k_range", "gaussian", "uniform", "fixed"] = "k_range",
        backprop_kwargs: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if k_min < 1:
            raise ValueError(f"k_min must be >= 1 (K = 0 would keep no graph to back-propagate), got {k_min}")
        if k_max is not None and k_max < k_min:
            raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")
        if backprop_strategy not in self.STRATEGIES:
            raise ValueError(f"backprop_strategy must be one of {self.STRATEGIES}, got {backprop_strategy!r}")
        needed = {
            "gaussian": {"mean", "std"},
            "uniform": {"min", "max"},
            "fixed": {"value"},
            "k_range": set(),
        }
        kwargs = dict(backprop_kwargs or {})
        if kwargs and set(kwargs) != needed[backprop_strategy]:
            raise ValueError(
                f"backprop_kwargs of {backprop_strategy!r} must have keys "
                f"{sorted(needed[backprop_strategy])}, got {sorted(kwargs)}"
            )
        self.k_min, self.k_max, self.reward_scale = k_min, k_max, reward_scale
        self.backprop_strategy, self.backprop_kwargs = backprop_strategy, kwargs

    def truncation_step(self, num_steps: int, generator: torch.Generator) -> int:
        """AlignProp's b ∈ [1, T): the first step whose denoiser call keeps its graph."""
        t, kw = num_steps, self.backprop_kwargs
        if t < 2:
            raise ValueError(
                f"AlignProp's {self.backprop_strategy!r} truncation needs at least 2 sampling steps"
            )
        for _ in range(10_000):
            if self.backprop_strategy == "gaussian":
                mean, std = kw.get("mean", 0.84 * t), kw.get("std", 0.1 * t)
                b = int(torch.normal(float(mean), float(std), (1,), generator=generator))
            elif self.backprop_strategy == "uniform":
                lo, hi = int(kw.get("min", 0)), int(kw.get("max", t))
                if hi <= max(lo, 1) or lo >= t:
                    raise ValueError(f"uniform truncation [{lo}, {hi}) holds no step b with 1 <= b < {t}")
                b = int(torch.randint(lo, hi, (1,), generator=generator))
            else:
                b = int(kw.get("value", t - 1))
                if not 1 <= b < t:
                    raise ValueError(f"fixed truncation step {b} is not in [1, {t})")
            if 1 <= b < t:
                return b
        raise ValueError(
            f"gaussian truncation {kw} almost never falls in [1, {t}); set mean and std for T = {t}"
        )

    def grad_steps(self, policy: DiffusionPolicy, generator: torch.Generator) -> int:
        """K for this update: uniform in [k_min, min(k_max, T)] ("k_range"), else T − b."""
        if self.backprop_strategy != "k_range":
            return policy.num_steps - self.truncation_step(policy.num_steps, generator)
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
