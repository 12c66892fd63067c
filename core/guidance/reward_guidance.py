"""Reward-gradient guidance on the predicted x̂0 (universal-guidance style forward guidance).

Bansal et al., "Universal Guidance for Diffusion Models", arXiv:2302.07121. Within a window of
steps, the hook differentiates the reward of the decoded one-step prediction x̂0(x_t) with respect to
x_t and shifts the model output so that x̂0 moves by `scale`·∇_{x_t} r(x̂0(x_t)) — uphill in reward.
The shift is expressed through the kernel (`shift_pred_x0`), so the same hook serves ε, v, x0 and
flow models. Each guided step costs one extra denoiser evaluation (with a backward pass).
Needs a differentiable reward.
"""

from __future__ import annotations

import torch

from diffalign.core.functional import expand_mask
from diffalign.core.guidance.base import TestTimeMethod
from diffalign.core.policy import DiffusionPolicy, RolloutHook, RolloutState
from diffalign.core.reward import Reward, SampleView


class RewardGuidanceHook(RolloutHook):
    """The per-step part of reward guidance (usable in any rollout)."""

    def __init__(
        self,
        reward: Reward,
        scale: float,
        start_fraction: float = 0.0,
        end_fraction: float = 1.0,
        normalize: bool = False,
    ) -> None:
        if not reward.differentiable:
            raise ValueError(f"reward guidance needs a differentiable reward; '{reward.name}' is not")
        self.reward, self.scale = reward, scale
        self.start_fraction, self.end_fraction, self.normalize = start_fraction, end_fraction, normalize

    def active(self, policy: DiffusionPolicy, index: int) -> bool:
        frac = index / policy.num_steps
        return self.start_fraction <= frac < self.end_fraction or (self.end_fraction >= 1 and frac >= 1)

    def before_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:
        if not self.active(policy, state.index) or self.scale == 0:
            return
        with torch.enable_grad():
            x = state.x_t.detach().requires_grad_(True)
            out = policy.model_output(x, state.t, state.cond, state.mask)
            x0 = policy.kernel.pred_x0(out, state.t, x)
            r = self.reward.evaluate(SampleView(policy.backbone, x0, state.mask), state.cond).scores
            (grad,) = torch.autograd.grad(r.sum(), x)
        if state.mask is not None:  # padded entries are not moved
            grad = grad * expand_mask(state.mask, grad)
        if self.normalize:
            norms = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-8)
            grad = grad / norms.reshape(-1, *([1] * (grad.dim() - 1)))
        state.model_output = policy.kernel.shift_pred_x0(
            state.model_output.float(), state.t, state.x_t, self.scale * grad.detach()
        )


class RewardGuidance(TestTimeMethod):
    """Sample with reward-gradient guidance in a window of steps.

    Args:
        scale: step size of the x̂0 shift (in model-space units per unit of reward gradient).
        start_fraction, end_fraction: the window, as fractions of the sampling steps (0 = first).
        normalize: use the unit-norm gradient per sample (scale is then a distance).
    """

    def __init__(
        self,
        scale: float = 1.0,
        start_fraction: float = 0.0,
        end_fraction: float = 1.0,
        normalize: bool = False,
    ) -> None:
        self.scale, self.start_fraction, self.end_fraction, self.normalize = (
            scale,
            start_fraction,
            end_fraction,
            normalize,
        )

    @torch.no_grad()
    def sample(self, policy, cond, reward, generator):
        hook = RewardGuidanceHook(reward, self.scale, self.start_fraction, self.end_fraction, self.normalize)
        traj = policy.rollout(cond, generator, hooks=[hook])
        return traj.x0, traj.mask, {}
