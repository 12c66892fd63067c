"""DDPO: policy gradient on denoising trajectories with a clipped importance ratio.

Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv:2305.13301.

Per rollout:
1. sample trajectories without gradient, storing every state and each step's log-prob;
2. score the final samples; advantages are per-prompt (running buffer) or batch normalised, clipped
   to ±`adv_clip_max`;
3. for `num_inner_epochs`, shuffle samples and, per sample, shuffle the steps and train on the first
   `timestep_fraction` of them: loss = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(log p_θ − log p_old).

Logs `reward_mean`, `reward_std`, `approx_kl` = ½·E[(log p_θ − log p_old)²], `clipfrac`, `ratio_mean`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm, AlignContext, prompt_keys
from diffalign.core.functional import gaussian_kl_same_std, repeat_batch
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import TERM_PREFIX, PerPromptNormalizer, batch_advantages
from diffalign.core.types import Trajectory


@dataclass
class StepBatch:
    """A micro-batch: rows of a trajectory and, per row, which step to re-score."""

    traj: Trajectory
    step: Tensor


def collect_rollouts(
    ctx: AlignContext, batch: Mapping[str, Any], repeat: int = 1, shared_noise: bool = False
) -> tuple[Trajectory, list[str], Tensor, dict[str, float]]:
    """No-grad rollout of a batch of conditions (each repeated `repeat` times), scored by the guarded reward.

    With `shared_noise`, the `repeat` samples of a condition start from the same x_T (GRPO's option).
    Returns the kept trajectories with `rewards` set, their prompt keys, their group ids (the index of
    the condition they came from), and metrics.
    """
    policy = ctx.policy
    backbone = policy.backbone
    rows = repeat_batch(dict(batch), repeat) if repeat > 1 else batch
    cond = backbone.encode_condition(rows)
    with torch.no_grad():
        x_T = mask = None
        if shared_noise and repeat > 1:
            x_T, mask = backbone.init_noise(backbone.encode_condition(batch), ctx.generator)
            x_T = x_T.repeat_interleave(repeat, dim=0)
            mask = mask.repeat_interleave(repeat, dim=0) if mask is not None else None
        traj = policy.rollout(cond, generator=ctx.generator, x_T=x_T, mask=mask)
        samples = backbone.decode(traj.x0, traj.mask)
    b = traj.batch_size
    scored = ctx.reward(samples, cond, b)
    keys = prompt_keys(rows, cond, b)
    groups = torch.arange(b // repeat).repeat_interleave(repeat)
    keep = scored.keep.to(traj.states.device)
    traj = traj[keep]
    traj.rewards = scored.scores.to(traj.states.device)[keep].float().detach()
    keys = [k for k, kept in zip(keys, keep.tolist(), strict=True) if kept]
    groups = groups[keep.cpu()]
    metrics = {
        "reward_mean": traj.rewards.mean().item(),
        "reward_std": traj.rewards.std(unbiased=False).item(),
        "reward_dropped": float(scored.num_dropped),
    }
    terms = {}
    for name, v in scored.info.items():
        v = torch.as_tensor(v).float()
        per_sample = v.dim() == 1 and len(v) == b
        metrics[f"reward/{name}"] = (v[keep.cpu()] if per_sample else v).mean().item()
        if per_sample and name.startswith(TERM_PREFIX):
            terms[name[len(TERM_PREFIX) :]] = v[keep.cpu()].to(traj.states.device)
    traj.extras["reward_terms"] = terms  # per-sample terms (e.g. of a WeightedSum), for Pareto comparisons
    return traj, keys, groups, metrics


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
    """

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
        self.kl_coef = kl_coef
        self.needs_reference = kl_coef > 0
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if advantages not in ("per_prompt", "batch"):
            raise ValueError(f"advantages must be 'per_prompt' or 'batch', got {advantages!r}")
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
        traj, keys, _, metrics = collect_rollouts(ctx, batch)
        if self.advantages == "per_prompt":
            adv = self.normalizer(keys, traj.rewards)
        else:
            adv = batch_advantages(traj.rewards)
        traj.advantages = adv.clamp(-self.adv_clip_max, self.adv_clip_max)
        return traj, metrics

    def minibatches(self, data: Trajectory, generator: torch.Generator) -> Iterator[list[StepBatch]]:
        b, t = data.batch_size, data.num_steps
        n_steps = max(1, int(t * self.timestep_fraction))
        bs = self.train_batch_size or b
        per_update = bs * self.gradient_accumulation_steps
        device = data.states.device
        for _ in range(self.num_inner_epochs):
            perm = torch.randperm(b, generator=generator).to(device)
            step_perm = torch.stack([torch.randperm(t, generator=generator) for _ in range(b)]).to(device)
            for start in range(0, b, per_update):
                micro = []
                for s in range(start, min(start + per_update, b), bs):
                    rows = perm[s : s + bs]
                    sub = data[rows]
                    micro.extend(StepBatch(sub, step_perm[rows, j]) for j in range(n_steps))
                yield micro

    def forward(self, policy: DiffusionPolicy, micro: StepBatch) -> dict[str, Tensor]:
        traj, step = micro.traj, micro.step
        rows = torch.arange(traj.batch_size, device=step.device)
        old = traj.log_probs[rows, step]
        new = policy.log_prob(traj, step)
        adv = traj.advantages if traj.advantages.dim() == 1 else traj.advantages[rows, step]
        out = ddpo_loss(new.log_prob, old, adv, self.clip_range)
        if self.kl_coef > 0:
            with policy.backbone.reference() as ref:
                ref_mean = policy.log_prob(traj, step, backbone=ref).mean
            kl = gaussian_kl_same_std(
                new.mean, ref_mean, new.std.detach(), traj.mask, policy.kernel.reduction
            )
            out["kl"] = kl.mean().detach()
            out["policy_loss"] = out["loss"].detach()
            out["loss"] = out["loss"] + self.kl_coef * kl.mean()
        return out


def ddpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> dict[str, Tensor]:
    """The clipped surrogate and its diagnostics; at ratio 1 the loss is −mean(advantages)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        return {
            "loss": loss,
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.detach().mean(),
            "ratio_max_dev": (ratio.detach() - 1.0).abs().max(),
        }
