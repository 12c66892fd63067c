"""ReFL: reward feedback learning on the one-step x̂0 prediction at a random late step.

Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
arXiv:2304.05977 (ReFL). Sample without grad down to a random step in the late part of the chain
(indices in [`min_step_fraction`, `max_step_fraction`) × T), make one differentiable denoiser call
there, take the model's x̂0 (`kernel.pred_x0`), decode and score it. The loss is the hinge
ReLU(`hinge` − r)·scale (ImageReward uses hinge 2) or −r·scale when `hinge` is None. (The paper also
adds the pretraining loss as a regulariser; combine with SupervisedDenoising data if needed.)
The no-grad part runs the full rollout and keeps the chosen state.
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


class ReFL(Algorithm):
    """One-step reward feedback at a random late step.

    Args:
        min_step_fraction, max_step_fraction: the step index is drawn uniformly from
            [min·T, max·T) (ImageReward: steps 30–39 of 40, i.e. 0.75–1.0).
        hinge: ReLU(hinge − r) instead of −r when set.
        reward_scale: loss multiplier (ImageReward's grad_scale).
    """

    needs_differentiable_reward = True

    def __init__(
        self,
        min_step_fraction: float = 0.75,
        max_step_fraction: float = 1.0,
        hinge: float | None = None,
        reward_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 <= min_step_fraction < max_step_fraction <= 1:
            raise ValueError("need 0 <= min_step_fraction < max_step_fraction <= 1")
        self.min_step_fraction, self.max_step_fraction = min_step_fraction, max_step_fraction
        self.hinge, self.reward_scale = hinge, reward_scale

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        return backprop_batch(ctx, batch), {}

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            traj = sample_batch(policy, micro.cond, micro.seed.tolist()).trajectory
        t_count = traj.num_steps
        lo = min(int(self.min_step_fraction * t_count), t_count - 1)
        hi = max(lo + 1, int(self.max_step_fraction * t_count))
        s = int(torch.randint(lo, hi, (1,), generator=micro.generator))
        x_t, t = traj.states[:, s], traj.timesteps[:, s]
        out = policy.model_output(x_t, t, traj.cond, traj.mask)
        x0 = policy.kernel.pred_x0(out, t, x_t)
        result = reward_loss(policy, micro.reward, x0, traj.mask, traj.cond, self.reward_scale, self.hinge)
        result["step_index"] = torch.tensor(float(s))
        return result
