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
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.distributed import SINGLE
from diffalign.core.functional import repeat_rows
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward_backprop import backprop_batch, reward_loss
from diffalign.core.rollouts import AlignContext
from diffalign.core.sampling import sample_batch
from diffalign.core.types import Batch


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

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        return backprop_batch(ctx, batch), {}

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        seeds = micro.seed.tolist()
        if self.lv_samples == 0:
            sampled = sample_batch(policy, micro.cond, seeds, grad_steps=self.k)
            return reward_loss(
                policy, micro.reward, sampled.x0, sampled.mask, sampled.cond, self.reward_scale
            )
        n = self.lv_samples
        with torch.no_grad():
            traj = sample_batch(policy, micro.cond, seeds).trajectory
        x0 = repeat_rows(traj.x0, n)
        mask = repeat_rows(traj.mask, n) if traj.mask is not None else None
        cond = traj.cond.repeat_interleave(n)
        t = repeat_rows(traj.timesteps[:, -1], n)
        # the re-noising and step noise of the global batch, this rank's rows of it
        ranks = micro.get("ranks") or SINGLE
        rows = ranks.rows(len(x0), x0.shape[1:])
        x_t = policy.kernel.add_noise(x0, rows.noise(x0.shape, micro.generator, mask, device=x0.device), t)
        out = policy.model_output(x_t, t, cond, mask)
        noise = rows.noise(x_t.shape, micro.generator, mask, device=x_t.device)
        step = policy.kernel.step(out, t, x_t, mask=mask, noise=noise)
        x0_new = step.mean + (step.prev_sample - step.mean).detach()
        return reward_loss(policy, micro.reward, x0_new, mask, cond, self.reward_scale)
