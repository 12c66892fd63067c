"""AWM: advantage-weighted matching — the pretraining loss, weighted by group-relative advantages.

Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models",
arXiv:2509.25050 (Flow-Factory `trainers/awm.py`). Like DiffusionNFT it needs no log-probs of the
sampler: rollouts (any sampler, the ODE included) keep their final samples, and training points
x_t = add_noise(x0, ε, t) are drawn on the forward process. The score-matching loss stands in for the
log-likelihood of a sample, log p_θ(x0) ≈ −‖f_θ(x_t, t) − target‖² (the ELBO's term at t), and the
update is the clipped policy-gradient objective on it:

    ℓ_θ = −mean ‖f_θ(x_t, t, c) − target‖²,   ρ = exp(ℓ_θ − ℓ_old),
    L = mean max(−A·ρ, −A·clip(ρ, 1 ± ε))  +  β_KL·‖f_θ − f_ref‖²

with ℓ_old the behaviour policy's value at the same point (computed when the batch is prepared, so the
ratio is exactly 1 before the first update). At ρ = 1 the gradient is that of mean(A·‖f_θ − target‖²):
the pretraining objective with each sample's weight its advantage — positive samples are fitted,
negative ones pushed away. It works for every prediction type (ε, v, x0, flow): the loss is the
backbone's own denoising loss (for ε models the ELBO weight differs from the flow one's; the advantage
weighting does not depend on it). Flow-Factory recommends a KL (to the reference here, or to an EMA)
and a clip range together: unconstrained, the advantage weighting collapses fast.

Logs the clipped-objective diagnostics (`approx_kl`, `clipfrac`, `ratio_mean`, `first_update_ratio_dev`,
checked by `RatioConsistencyCheck`), `matching_loss` (the unweighted ‖f_θ − target‖²) and `kl`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.advantages import trajectory_advantages
from diffalign.core.algorithms.base import Algorithm
from diffalign.core.forward_process import (
    TimestepStrategy,
    forward_points,
    point_minibatches,
    training_timesteps,
)
from diffalign.core.functional import masked_mse, reduce_event
from diffalign.core.kernels import TransitionKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.policy_gradient import SURROGATE_REDUCTION, clipped_surrogate
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Batch


class AWM(Algorithm):
    """Advantage-weighted matching.

    Args:
        clip_range: ε of the clipped ratio (Flow-Factory's 1e-4).
        kl_coef: β_KL of ‖f_θ − f_ref‖² (0 keeps no reference copy).
        group_size, std_scope, advantage_aggregation, adv_clip_max, shared_noise: as in `GRPO`.
        sampler: the rollout kernel (None: the policy's; e.g. the ODE `FlowSDEKernel(noise_level: 0)`).
        timesteps, timestep_fraction: the training points per sample (see `DiffusionNFT`; Flow-Factory's
            default trains 90 % of the schedule).
        num_inner_epochs, train_batch_size, gradient_accumulation_steps: as in DDPO.
    """

    metric_reduction = SURROGATE_REDUCTION

    def __init__(
        self,
        clip_range: float = 1e-4,
        kl_coef: float = 0.0,
        group_size: int = 8,
        std_scope: Literal["group", "global"] = "group",
        advantage_aggregation: Literal["sum", "per_reward"] = "sum",
        adv_clip_max: float = 5.0,
        shared_noise: bool = False,
        sampler: TransitionKernel | None = None,
        timesteps: TimestepStrategy = "schedule",
        timestep_fraction: float = 0.9,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
    ) -> None:
        super().__init__()
        if clip_range <= 0 or kl_coef < 0 or adv_clip_max <= 0 or group_size < 2:
            raise ValueError("AWM needs clip_range > 0, kl_coef >= 0, adv_clip_max > 0 and group_size >= 2")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if advantage_aggregation not in ("sum", "per_reward"):
            raise ValueError(
                f"advantage_aggregation must be 'sum' or 'per_reward', got {advantage_aggregation!r}"
            )
        self.clip_range, self.kl_coef, self.adv_clip_max = clip_range, kl_coef, adv_clip_max
        self.needs_reference = kl_coef > 0
        self.group_size, self.std_scope, self.shared_noise = group_size, std_scope, shared_noise
        self.advantage_aggregation, self.sampler = advantage_aggregation, sampler
        self.timesteps, self.timestep_fraction = timesteps, timestep_fraction
        self.num_inner_epochs = num_inner_epochs
        self.train_batch_size, self.gradient_accumulation_steps = (
            train_batch_size,
            gradient_accumulation_steps,
        )

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        policy = ctx.policy
        traj, metrics = collect_rollouts(ctx, batch, self.group_size, self.shared_noise, kernel=self.sampler)
        adv, adv_metrics = trajectory_advantages(
            traj, ctx.reward, self.advantage_aggregation, self.std_scope, ctx.ranks
        )
        count = max(1, int(policy.num_steps * self.timestep_fraction))
        rows = ctx.rows(len(traj), tuple(traj.x0.shape[1:]))  # timesteps and noise of the global batch
        t = training_timesteps(policy, len(traj), count, self.timesteps, ctx.generator, rows)

        def behaviour(x_t: Tensor, tt: Tensor) -> Tensor:
            return policy.backbone.denoise(x_t, tt, traj.cond, traj.mask)

        data = forward_points(policy, traj.x0, traj.cond, traj.mask, t, ctx.generator, behaviour, rows)
        old_lp = torch.stack(
            [-masked_mse(data.reference[:, k], data.target[:, k], traj.mask) for k in range(count)], dim=1
        )
        metrics.update(adv_metrics)
        adv = adv.clamp(-self.adv_clip_max, self.adv_clip_max).to(traj.x0.device)
        return data.replace(advantages=adv, reference_log_prob=old_lp), metrics

    def minibatches(self, data: Batch, generator: torch.Generator) -> Iterator[list[Batch]]:
        yield from point_minibatches(
            data, generator, self.num_inner_epochs, self.train_batch_size, self.gradient_accumulation_steps
        )

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        backbone = policy.backbone
        new = backbone.denoise(micro.x_t, micro.t, micro.cond, micro.mask).float()
        log_prob = -masked_mse(new, micro.target, micro.mask)
        out = clipped_surrogate(log_prob, micro.reference_log_prob, micro.advantages, self.clip_range)
        out["matching_loss"] = (-log_prob).mean().detach()
        if self.kl_coef > 0:
            with backbone.reference() as ref:
                ref_out = ref.denoise(micro.x_t, micro.t, micro.cond, micro.mask).float()
            kl = reduce_event((new - ref_out) ** 2, micro.mask).mean()
            out["kl"] = kl.detach()
            out["policy_loss"] = out["loss"].detach()
            out["loss"] = out["loss"] + self.kl_coef * kl
        return out
