"""DRaFT: direct reward fine-tuning by back-propagating a differentiable reward through the sampler.

Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv:2309.17400.

- DRaFT-K (`lv_samples: 0`): sample with the graph kept through the last K denoiser calls
  (`DiffusionPolicy.rollout(grad_steps=K)`; earlier steps run without grad), decode, score, and
  minimise −scale·mean(r). K = 1 is the paper's strongest setting; K = T is full backprop (use
  `gradient_checkpointing` on the policy).
- DRaFT-LV (`lv_samples: n > 0`): the low-variance K = 1 estimator. Sample x_0 without grad, then n
  times re-noise it to the last sampling timestep, x̃ = add_noise(x_0, ε_i, t_last), take one
  differentiable denoising step back to x̃_0 and score it; the loss averages the n rewards. The n
  re-noisings share one denoiser batch. (No public reference implements it; this follows the paper's
  description.)

Needs a differentiable reward: `AlignmentModule` refuses another with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.functional import randn
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward
from diffalign.core.types import Cond


@dataclass
class BackpropBatch:
    """Conditions plus what a differentiable rollout needs: the guarded reward and the run's RNG."""

    cond: Cond
    reward: GuardedReward
    generator: torch.Generator
    batch_size: int


def reward_loss(
    policy: DiffusionPolicy,
    micro: BackpropBatch,
    x0: Tensor,
    mask: Tensor | None,
    cond: Cond,
    scale: float,
    hinge: float | None = None,
) -> dict[str, Tensor]:
    """Decode `x0` (with its graph), score it, and return −scale·mean(r) (or the hinge ReLU(h − r))."""
    samples = policy.backbone.decode(x0, mask)
    scored = micro.reward(samples, cond, x0.shape[0])
    r = scored.scores[scored.keep.to(scored.scores.device)]
    if not r.requires_grad:
        raise RuntimeError("the reward returned scores without a gradient; is it really differentiable?")
    loss = torch.relu(hinge - r).mean() if hinge is not None else -r.mean()
    return {
        "loss": scale * loss,
        "reward_mean": r.detach().mean(),
        "reward_std": r.detach().std(unbiased=False),
        "reward_dropped": torch.tensor(float(scored.num_dropped)),
    }


class DRaFT(Algorithm):
    """DRaFT-K and DRaFT-LV.

    Args:
        k: denoiser calls kept in the graph (DRaFT-K); ignored by DRaFT-LV.
        lv_samples: n > 0 selects DRaFT-LV with n re-noisings of each final sample.
        reward_scale: the loss is −reward_scale·mean(reward).
    """

    needs_differentiable_reward = True

    def __init__(self, k: int = 1, lv_samples: int = 0, reward_scale: float = 1.0) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if lv_samples < 0:
            raise ValueError(f"lv_samples must be >= 0, got {lv_samples}")
        self.k, self.lv_samples, self.reward_scale = k, lv_samples, reward_scale

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[BackpropBatch, dict[str, float]]:
        cond = ctx.policy.backbone.encode_condition(batch)
        b = next(iter(cond.values())).shape[0]
        return BackpropBatch(cond, ctx.reward, ctx.generator, b), {}

    def grad_steps(self, policy: DiffusionPolicy, generator: torch.Generator) -> int:
        return self.k

    def forward(self, policy: DiffusionPolicy, micro: BackpropBatch) -> dict[str, Tensor]:
        if self.lv_samples == 0:
            traj = policy.rollout(
                micro.cond, micro.generator, grad_steps=self.grad_steps(policy, micro.generator)
            )
            return reward_loss(policy, micro, traj.x0, traj.mask, traj.cond, self.reward_scale)
        n = self.lv_samples
        with torch.no_grad():
            traj = policy.rollout(micro.cond, micro.generator)
        x0 = traj.x0.repeat_interleave(n, dim=0)
        mask = traj.mask.repeat_interleave(n, dim=0) if traj.mask is not None else None
        cond = {k: v.repeat_interleave(n, dim=0) for k, v in traj.cond.items()}
        t = traj.timesteps[:, -1].repeat_interleave(n)
        x_t = policy.kernel.add_noise(x0, randn(x0.shape, micro.generator, device=x0.device), t)
        step = policy.kernel.step(
            policy.model_output(x_t, t, cond, mask), t, x_t, generator=micro.generator, mask=mask
        )
        x0_new = step.mean + (step.prev_sample - step.mean).detach()
        return reward_loss(policy, micro, x0_new, mask, cond, self.reward_scale)
