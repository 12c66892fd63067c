"""SVDD: soft value-based decoding with the predicted-x̂0 value (no training).

Li et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft
Value-Based Decoding", arXiv:2408.08252 (SVDD-PM). At every step draw `candidates` next states
x_{t-1}^{(m)} from the base transition p(·|x_t) (the step's own sample is candidate 0), value each by
the reward of its one-step prediction x̂0(x_{t-1}^{(m)}) (the decoded sample itself at the last step),
and keep the best (`alpha: 0`) or draw one ∝ exp(v/alpha). The target is
p(x_{t-1}|x_t)·exp(v(x_{t-1})/alpha); as alpha → ∞ the base sampler is recovered. Each step costs
`candidates` extra denoiser evaluations for the values.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.core.functional import expand_mask, masked_noise
from diffalign.core.guidance.base import TestTimeMethod, score
from diffalign.core.policy import DiffusionPolicy, RolloutHook, RolloutState
from diffalign.core.reward import Reward
from diffalign.core.sampling import per_row_multinomial, repeat_generators


class SVDDHook(RolloutHook):
    """Per-step candidate selection by predicted-x̂0 value."""

    def __init__(self, reward: Reward, candidates: int, alpha: float, generator: Any) -> None:
        self.reward, self.m, self.alpha, self.generator = reward, candidates, alpha, generator

    def after_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:
        n, m = state.prev_sample.shape[0], self.m
        step = state.step
        event = step.mean.shape[1:]
        # each row's m − 1 extra candidates, from that row's generator; padded entries get no noise
        mask_m = state.mask.repeat_interleave(m - 1, dim=0) if state.mask is not None else None
        noise = masked_noise(
            (n * (m - 1), *event), repeat_generators(self.generator, m - 1), mask_m, device=step.mean.device
        ).reshape(n, m - 1, *event)
        extra = step.mean.unsqueeze(1) + step.std.unsqueeze(1) * noise
        if state.mask is not None:  # padded entries keep their value
            keep = expand_mask(state.mask, step.mean).unsqueeze(1) > 0
            extra = torch.where(keep, extra, state.x_t.float().unsqueeze(1))
        cands = torch.cat([state.prev_sample.unsqueeze(1), extra], dim=1).reshape(n * m, *event)
        cond_m = state.cond.repeat_interleave(m)
        mask_m = state.mask.repeat_interleave(m, dim=0) if state.mask is not None else None
        timesteps = policy.kernel.scheduler.timesteps
        if state.index + 1 < len(timesteps):
            t_next = timesteps[state.index + 1].to(cands.device).expand(n * m)
            x0 = policy.kernel.pred_x0(policy.model_output(cands, t_next, cond_m, mask_m), t_next, cands)
        else:
            x0 = cands
        v = score(self.reward, policy, x0, mask_m, cond_m).reshape(n, m)
        if self.alpha == 0:
            choice = torch.nan_to_num(v, nan=float("-inf")).argmax(dim=1)
        else:
            logits = torch.nan_to_num(v / self.alpha, nan=float("-inf"))
            probs = torch.softmax(logits - logits.max(dim=1, keepdim=True).values, dim=1)
            choice = per_row_multinomial(probs, 1, self.generator).flatten().to(v.device)
        state.prev_sample = cands.reshape(n, m, *step.mean.shape[1:])[torch.arange(n), choice]


class SVDD(TestTimeMethod):
    """Value-guided decoding.

    Args:
        candidates: M next-state candidates per step (≥ 1; 1 is the base sampler).
        alpha: 0 keeps the best candidate; > 0 samples ∝ exp(value/alpha).
    """

    def __init__(self, candidates: int = 4, alpha: float = 0.0) -> None:
        if candidates < 1 or alpha < 0:
            raise ValueError("candidates must be >= 1 and alpha >= 0")
        self.candidates, self.alpha = candidates, alpha

    @torch.no_grad()
    def sample(self, policy, cond, reward, generator):
        hooks = [SVDDHook(reward, self.candidates, self.alpha, generator)] if self.candidates > 1 else []
        traj = policy.rollout(cond, generator, hooks=hooks)
        return traj.x0, traj.mask, {}
