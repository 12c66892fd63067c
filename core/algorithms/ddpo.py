"""DDPO: policy gradient on denoising trajectories with a clipped importance ratio.

Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv:2305.13301.

Per rollout:
1. sample trajectories without gradient, storing every state and each step's log-prob
   (`core.rollouts.collect_rollouts`);
2. score the final samples; advantages are per-prompt (running buffer) or batch normalised, clipped
   to ±`adv_clip_max` (statistics over the global batch when several processes train);
3. for `num_inner_epochs`, shuffle samples and, per sample, shuffle the steps and train on the first
   `timestep_fraction` of them: loss = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(log p_θ − log p_old).

With `kl_coef` > 0 a per-step closed-form KL to the frozen initial model is added (DPOK's penalty).
Logs `reward_mean`, `reward_std`, `approx_kl` = ½·E[(log p_θ − log p_old)²], `clipfrac`, `ratio_mean`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.advantages import PerPromptNormalizer, batch_advantages, gather_rewards
from diffalign.core.algorithms.base import Algorithm
from diffalign.core.kernels import StepOutput
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.policy_gradient import (
    SURROGATE_REDUCTION,
    clipped_surrogate,
    reference_kl,
    step_minibatches,
)
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Batch, Trajectory


class DDPO(Algorithm):
    """DDPO with importance sampling and clipping (DDPO_IS).

    Args:
        clip_range: ε of the clipped ratio (1e-4 in DDPO and Flow-GRPO with mean-reduced log-probs).
        adv_clip_max: advantages are clipped to ±this.
        advantages: "per_prompt" (running per-prompt statistics) or "batch".
        per_prompt_buffer: rewards kept per prompt; per_prompt_min_count: below it, batch statistics.
        timestep_fraction: fraction of the T steps trained per sample (random subset per sample).
        num_inner_epochs: passes over each rollout batch.
        train_batch_size: samples per micro-batch (None: the whole rollout batch).
        gradient_accumulation_steps: micro-batches of samples per optimiser step (each covers all
            trained steps), as in ddpo-pytorch.
        kl_coef: β of a per-step KL(π_θ ‖ π_ref) penalty to the frozen initial model (0: plain DDPO;
            DPOK sets it by default). The KL of two Gaussian steps with the same std is
            ‖μ_θ − μ_ref‖²/(2σ²), reduced over event dims like the log-probs.

    Speed options that change the algorithm (docs/performance.md): `timestep_fraction` < 1 trains on a
    random subset of the steps; the policy's `rollout_steps` samples training rollouts with fewer steps
    than evaluation; `guidance_scale: 1` on the policy trains (and samples) without classifier-free
    guidance.
    """

    metric_reduction = SURROGATE_REDUCTION

    def __init__(
        self,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantages: Literal["per_prompt", "batch"] = "per_prompt",
        per_prompt_buffer: int = 32,
        per_prompt_min_count: int = 16,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
        kl_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if advantages not in ("per_prompt", "batch"):
            raise ValueError(f"advantages must be 'per_prompt' or 'batch', got {advantages!r}")
        self.kl_coef = kl_coef
        self.needs_reference = kl_coef > 0
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.advantages = advantages
        self.timestep_fraction = timestep_fraction
        self.num_inner_epochs = num_inner_epochs
        self.train_batch_size = train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.normalizer = PerPromptNormalizer(per_prompt_buffer, per_prompt_min_count)

    def algorithm_state(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict()}

    def load_algorithm_state(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state.get("normalizer", {}))

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Trajectory, dict[str, float]]:
        traj, metrics = collect_rollouts(ctx, batch)
        # statistics over the global batch (every rank's rows); each rank keeps its rows' advantages, and
        # every rank's running buffers see the same rewards (so any rank's checkpoint holds them)
        every = gather_rewards(ctx.ranks, traj.rewards, traj.extras["key"], traj.extras["group"])
        if self.advantages == "per_prompt":
            adv = self.normalizer(every.keys, every.rewards)
        else:
            adv = batch_advantages(every.rewards)
        traj.advantages = every.shard.take(adv).clamp(-self.adv_clip_max, self.adv_clip_max)
        return traj, metrics

    def minibatches(self, data: Trajectory, generator: torch.Generator) -> Iterator[list[Batch]]:
        yield from step_minibatches(
            data,
            generator,
            self.timestep_fraction,
            self.num_inner_epochs,
            self.train_batch_size,
            self.gradient_accumulation_steps,
        )

    def surrogate(self, policy: DiffusionPolicy, micro: Batch, new: StepOutput) -> dict[str, Tensor]:
        """The clipped objective of the re-scored steps `new` of a micro-batch (GRPO-Guard overrides it)."""
        traj, step = micro.traj, micro.step
        rows = torch.arange(traj.batch_size, device=step.device)
        adv = traj.advantages if traj.advantages.dim() == 1 else traj.advantages[rows, step]
        return clipped_surrogate(new.log_prob, traj.log_probs[rows, step], adv, self.clip_range)

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        new = policy.log_prob(micro.traj, micro.step)
        out = self.surrogate(policy, micro, new)
        if self.kl_coef > 0:
            kl = reference_kl(policy, micro, new)
            out["kl"] = kl.mean().detach()
            out["policy_loss"] = out["loss"].detach()
            out["loss"] = out["loss"] + self.kl_coef * kl.mean()
        return out
