"""GRPO-Guard: GRPO with a normalised, per-step reweighted importance ratio.

Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv:2510.22319 (Flow-Factory's `grpo-guard` trainer). The SDE step's log-ratio has a
negative mean, −‖μ_θ − μ_old‖²/(2s²), and a spread that grows as 1/s at low-noise steps: the clip range
then bounds some steps far more than others, and the objective keeps pushing through the rarely clipped
side (implicit over-optimisation, formulas.md §11.3). GRPO-Guard replaces log ρ by

    log ρ̃ = s·log ρ + ‖μ_θ − μ_old‖²/(2s)   (= reduce(z·(μ_θ − μ_old)) for the stored x' = μ_old + s·z)

(`core.policy_gradient.guarded_log_ratio`): RatioNorm removes the bias, the factor s reweights each
step's gradient so that low-noise steps no longer dominate. The behaviour policy's step means are stored
at rollout time (`extras["means"]`), so they are compared exactly. Everything else — groups, windows,
per-reward advantages, the KL — is `GRPO`'s.

The derivation holds for any Gaussian kernel (Flow-SDE, Dance-SDE, CPS, DDIM); Flow-Factory allows only
Flow-SDE. Logs the clipped-objective diagnostics of the normalised ratio, plus `raw_log_ratio_mean`,
the plain (biased) log-ratio's mean, for comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.core.algorithms.grpo import GRPO
from diffalign.core.kernels import StepOutput
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.policy_gradient import clipped_surrogate, guarded_log_ratio
from diffalign.core.types import Batch


class GRPOGuard(GRPO):
    """GRPO with GRPO-Guard's ratio (same arguments as `GRPO`)."""

    records_means = True

    def surrogate(self, policy: DiffusionPolicy, micro: Batch, new: StepOutput) -> dict[str, Tensor]:
        traj, step = micro.traj, micro.step
        rows = torch.arange(traj.batch_size, device=step.device)
        old = traj.log_probs[rows, step]
        old_mean = traj.extras["means"][rows, step]
        adv = traj.advantages if traj.advantages.dim() == 1 else traj.advantages[rows, step]
        log_ratio = guarded_log_ratio(new, old, old_mean, traj.mask, policy.kernel.reduction)
        out = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, self.clip_range)
        out["raw_log_ratio_mean"] = (new.log_prob - old).mean().detach()
        return out
