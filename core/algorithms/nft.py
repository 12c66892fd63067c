"""DiffusionNFT: online RL on the forward process, with implicit positive and negative policies.

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117
(`NVlabs/DiffusionNFT:scripts/train_nft_sd3.py`; formulas.md §9). No log-probs: rollouts keep only
their final samples, rewards and conditions, so any sampler works — including the deterministic ODE
(`sampler: FlowSDEKernel(noise_level: 0)`, the reference's choice) — and the sampler need not be the
policy's. Per sample, rewards become group-relative advantages A (clipped to ±A_max) and a weight
r = clip(A/(2·A_max) + ½, 0, 1). At training points x_t = add_noise(x0, ε, t) the live output v_θ and the
"old" policy's v_old define

    v⁺ = β·v_θ + (1 − β)·v_old,    v⁻ = (1 + β)·v_old − β·v_θ,    x̂0^± = pred_x0(v^±, t, x_t)
    L = A_max · mean[ r·‖x̂0⁺ − x0‖²/w⁺ + (1 − r)·‖x̂0⁻ − x0‖²/w⁻ ] / β  +  β_KL·‖v_θ − v_ref‖²

with w^± = mean|x̂0^± − x0| (detached, ≥ 1e-5; the reference's adaptive weights) and the KL to the frozen
reference in output space. At v_θ = v_old the gradient is A·∇(‖x̂0(v) − x0‖²/w): advantage-weighted
regression toward good samples and away from bad ones, whatever β (a unit test checks this).

The old policy is a soft-updated copy of the trainable weights (`core.forward_process.SoftCopy`): after
every batch old ← d·old + (1 − d)·θ with d = min(max(0, n − flat_steps)·decay_rate, max_decay) at
optimiser step n (the reference's `decay_type` 1: rate 0.001, cap 0.5; rate 0 is a hard copy, i.e.
on-policy). With LoRA the copy holds only the adapter weights — a second set of adapter tensors swapped
into the adapters, rather than a second peft adapter, so any backbone works the same way. Rollouts are
sampled with the old policy (`sample_with_old`, as the reference does).

Parameterisations: x̂0 is linear in the model output for every prediction type (ε, v, x0, flow), so v⁺
and v⁻ are the implicit policies for ε models too (ε⁺ = β·ε_θ + (1 − β)·ε_old, ...). A scheduler with
`clip_sample` clamps x̂0, which breaks that linearity: use NFT on schedulers without it. The loss trains
the conditional denoiser; classifier-free guidance (if the policy samples with it) is not part of it, as
in the reference (guidance_scale 1).

Logs `policy_loss`, `kl` (with a KL), `old_deviation` = mean (v_θ − v_old)², `old_decay`, `weight_r` (mean r).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.advantages import trajectory_advantages
from diffalign.core.algorithms.base import Algorithm
from diffalign.core.forward_process import (
    SoftCopy,
    TimestepStrategy,
    forward_points,
    point_minibatches,
    training_timesteps,
)
from diffalign.core.functional import reduce_event
from diffalign.core.kernels import TransitionKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Batch


def nft_loss(
    kernel: TransitionKernel,
    new: Tensor,
    old: Tensor,
    x_t: Tensor,
    t: Tensor,
    x0: Tensor,
    advantages: Tensor,
    beta: float,
    adv_clip_max: float,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """DiffusionNFT's policy loss (module docstring) for live outputs `new` and old outputs `old` at x_t."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    r = (adv / (2 * adv_clip_max) + 0.5).clamp(0, 1)
    old = old.detach()
    terms = []
    for v in (beta * new + (1 - beta) * old, (1 + beta) * old - beta * new):
        err = kernel.pred_x0(v, t, x_t) - x0
        w = reduce_event(err.detach().abs().double(), mask).clamp_min(1e-5).float()
        terms.append(reduce_event(err**2, mask) / w)
    per_sample = (r * terms[0] + (1 - r) * terms[1]) / beta
    return {
        "loss": adv_clip_max * per_sample.mean(),
        "weight_r": r.mean().detach(),
        "old_deviation": reduce_event((new.detach() - old) ** 2, mask).mean(),
    }


class DiffusionNFT(Algorithm):
    """Negative-aware fine-tuning on the forward process.

    Args:
        beta: β, the step from the old policy toward the implicit positive policy (the reference: 1.0;
            0.1 for OCR).
        kl_coef: β_KL of ‖v_θ − v_ref‖² (the reference: 1e-4; 0 keeps no reference copy).
        group_size: samples per condition; advantages are group-relative.
        std_scope: "group" or "global" std of the advantages.
        advantage_aggregation: "sum" or "per_reward" (GDPO, with a `WeightedSum` reward).
        adv_clip_max: A_max.
        shared_noise: a group's samples start from one x_T (needs a stochastic sampler to differ).
        sampler: the rollout kernel (None: the policy's; e.g. the ODE `FlowSDEKernel(noise_level: 0)`).
        sample_with_old: sample rollouts with the old policy (the reference does).
        timesteps: training timesteps, "schedule" (the sampling schedule's, shuffled per sample, the
            reference's) or "uniform".
        timestep_fraction: points per sample = max(1, ⌊T·fraction⌋) (the reference: 0.99).
        decay_rate, max_decay, flat_steps: the old policy's decay schedule (module docstring).
        num_inner_epochs, train_batch_size, gradient_accumulation_steps: as in DDPO (an optimiser step
            covers train_batch_size × gradient_accumulation_steps samples at all their points).
    """

    progress_metric = "reward_mean"

    def __init__(
        self,
        beta: float = 1.0,
        kl_coef: float = 1e-4,
        group_size: int = 8,
        std_scope: Literal["group", "global"] = "group",
        advantage_aggregation: Literal["sum", "per_reward"] = "sum",
        adv_clip_max: float = 5.0,
        shared_noise: bool = False,
        sampler: TransitionKernel | None = None,
        sample_with_old: bool = True,
        timesteps: TimestepStrategy = "schedule",
        timestep_fraction: float = 0.99,
        decay_rate: float = 0.001,
        max_decay: float = 0.5,
        flat_steps: int = 0,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
    ) -> None:
        super().__init__()
        if beta <= 0 or kl_coef < 0 or adv_clip_max <= 0 or group_size < 2:
            raise ValueError(
                "DiffusionNFT needs beta > 0, kl_coef >= 0, adv_clip_max > 0 and group_size >= 2"
            )
        if not 0 < timestep_fraction <= 1 or not 0 <= max_decay < 1 or decay_rate < 0:
            raise ValueError("need 0 < timestep_fraction <= 1, 0 <= max_decay < 1 and decay_rate >= 0")
        if advantage_aggregation not in ("sum", "per_reward"):
            raise ValueError(
                f"advantage_aggregation must be 'sum' or 'per_reward', got {advantage_aggregation!r}"
            )
        self.beta, self.kl_coef, self.adv_clip_max = beta, kl_coef, adv_clip_max
        self.needs_reference = kl_coef > 0
        self.group_size, self.std_scope, self.shared_noise = group_size, std_scope, shared_noise
        self.advantage_aggregation = advantage_aggregation
        self.sampler, self.sample_with_old = sampler, sample_with_old
        self.timesteps, self.timestep_fraction = timesteps, timestep_fraction
        self.decay_rate, self.max_decay, self.flat_steps = decay_rate, max_decay, flat_steps
        self.num_inner_epochs = num_inner_epochs
        self.train_batch_size, self.gradient_accumulation_steps = (
            train_batch_size,
            gradient_accumulation_steps,
        )
        self.old = SoftCopy()
        self.updates = 0  # optimiser steps taken
        self.synced = 0  # optimiser steps the old copy has seen

    def decay(self) -> float:
        """The old policy's decay at the current optimiser step."""
        return min(max(0, self.updates - self.flat_steps) * self.decay_rate, self.max_decay)

    def algorithm_state(self) -> dict[str, Any]:
        return {"old": self.old.state_dict(), "updates": self.updates, "synced": self.synced}

    def load_algorithm_state(self, state: dict[str, Any]) -> None:
        self.old.load_state_dict(state.get("old", {}))
        self.updates, self.synced = int(state.get("updates", 0)), int(state.get("synced", 0))

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        policy = ctx.policy
        params = list(policy.backbone.trainable_parameters())
        if not self.old or self.updates > self.synced:  # the soft update after the previous batch
            self.old.update(params, self.decay())
            self.synced = self.updates
        with self.old.swapped_in(params) if self.sample_with_old else nullcontext():
            traj, metrics = collect_rollouts(
                ctx, batch, self.group_size, self.shared_noise, kernel=self.sampler
            )
        adv, adv_metrics = trajectory_advantages(
            traj, ctx.reward, self.advantage_aggregation, self.std_scope, ctx.ranks
        )
        count = max(1, int(policy.num_steps * self.timestep_fraction))
        rows = ctx.rows(len(traj), tuple(traj.x0.shape[1:]))  # timesteps and noise of the global batch
        t = training_timesteps(policy, len(traj), count, self.timesteps, ctx.generator, rows)

        def old_output(x_t: Tensor, tt: Tensor) -> Tensor:
            with self.old.swapped_in(params):
                return policy.backbone.denoise(x_t, tt, traj.cond, traj.mask)

        data = forward_points(policy, traj.x0, traj.cond, traj.mask, t, ctx.generator, old_output, rows)
        metrics.update(adv_metrics)
        metrics["old_decay"] = self.decay()
        return data.replace(advantages=adv.to(traj.x0.device)), metrics

    def minibatches(self, data: Batch, generator: torch.Generator) -> Iterator[list[Batch]]:
        for micro in point_minibatches(
            data, generator, self.num_inner_epochs, self.train_batch_size, self.gradient_accumulation_steps
        ):
            self.updates += 1  # counted when handed out: the old copy's next update sees this step
            yield micro

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        backbone = policy.backbone
        new = backbone.denoise(micro.x_t, micro.t, micro.cond, micro.mask).float()
        out = nft_loss(
            policy.kernel,
            new,
            micro.reference,
            micro.x_t,
            micro.t,
            micro.x0,
            micro.advantages,
            self.beta,
            self.adv_clip_max,
            micro.mask,
        )
        out["policy_loss"] = out["loss"].detach()
        if self.kl_coef > 0:
            with backbone.reference() as ref:
                ref_out = ref.denoise(micro.x_t, micro.t, micro.cond, micro.mask).float()
            kl = reduce_event((new - ref_out) ** 2, micro.mask).mean()
            out["kl"] = kl.detach()
            out["loss"] = out["loss"] + self.kl_coef * kl
        return out
