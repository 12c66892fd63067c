"""Online data for alignment: sample a batch of conditions with the current policy and score it.

`collect_rollouts` is the shared first step of every online method (DDPO, DPOK, GRPO, D3PO, RWR, RAFT):
no-grad sampling through `core.sampling` (one seed per row, drawn from the run's generator), scoring by
the guarded reward (NaN / raising / misshapen rewards stop or drop, as configured), and the bookkeeping
the methods need — prompt keys, group ids, per-term rewards and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.core.advantages import row_keys
from diffalign.core.functional import repeat_batch, repeat_rows
from diffalign.core.kernels import TransitionKernel
from diffalign.core.policy import DiffusionPolicy, RolloutHook
from diffalign.core.reward import TERM_PREFIX, GuardedReward, reward_metrics
from diffalign.core.sampling import draw_seeds, row_generators, sample_batch, score_batch
from diffalign.core.types import Trajectory


@dataclass
class AlignContext:
    """What `Algorithm.prepare` may use: the policy, the guarded reward, the run's RNG and the device."""

    policy: DiffusionPolicy
    reward: GuardedReward | None
    generator: torch.Generator
    device: torch.device


def collect_rollouts(
    ctx: AlignContext,
    batch: Mapping[str, Any],
    repeat: int = 1,
    shared_noise: bool = False,
    kernel: TransitionKernel | None = None,
    sde_window: tuple[int, int] | None = None,
    hooks: Sequence[RolloutHook] = (),
    record_means: bool = False,
) -> tuple[Trajectory, dict[str, float]]:
    """No-grad rollouts of a batch of conditions (each repeated `repeat` times), scored by the guarded
    reward; rows whose reward was dropped are removed.

    With `shared_noise`, the `repeat` samples of a condition start from the same x_T (GRPO's, DanceGRPO's
    and D3PO's option) and differ only in their step noise. `kernel` samples with another kernel than the
    policy's (DiffusionNFT and AWM may roll out with the deterministic ODE); `sde_window` makes only those
    steps stochastic and keeps only them (MixGRPO); `hooks` are per-step rollout hooks; `record_means`
    keeps each step's Gaussian mean in `extras["means"]` (GRPO-Guard).

    Returns the kept trajectories with `rewards` set and, in `extras`: `key` (the prompt key of each
    row), `group` (the index of the condition it came from), `seed` and `reward_terms` (per-sample terms
    of a composite reward, for Pareto comparisons); and the metrics `reward_mean`, `reward_std`,
    `reward_dropped` and `reward/<info>` means.
    """
    if ctx.reward is None:
        raise ValueError("collect_rollouts needs a reward")
    policy, backbone = ctx.policy, ctx.policy.backbone
    rows = repeat_batch(dict(batch), repeat) if repeat > 1 else dict(batch)
    cond = backbone.condition(rows)
    seeds = draw_seeds(ctx.generator, len(cond))
    x_T = mask = None
    with torch.no_grad(), policy.sampling_with(kernel):
        if shared_noise and repeat > 1:
            first = cond[torch.arange(0, len(cond), repeat)]
            x_T, mask = backbone.init_noise(first, row_generators(seeds[::repeat]))
            x_T = repeat_rows(x_T, repeat)
            mask = repeat_rows(mask, repeat) if mask is not None else None
        sampled = sample_batch(
            policy,
            cond,
            seeds,
            x_T=x_T,
            mask=mask,
            sde_window=sde_window,
            hooks=hooks,
            record_means=record_means,
        )
        scored = score_batch(sampled, ctx.reward)
    traj = sampled.trajectory
    b = traj.batch_size
    traj.extras["key"] = row_keys(traj.cond)
    traj.extras["group"] = torch.arange(b // repeat).repeat_interleave(repeat)
    traj.extras["seed"] = torch.tensor(seeds, dtype=torch.int64)
    terms = {
        name[len(TERM_PREFIX) :]: torch.as_tensor(v).float().to(traj.states.device)
        for name, v in scored.info.items()
        if name.startswith(TERM_PREFIX) and torch.as_tensor(v).dim() == 1 and len(v) == b
    }
    traj.extras["reward_terms"] = terms
    traj.rewards = scored.scores.to(traj.states.device).float().detach()
    keep = scored.keep.to(traj.states.device)
    traj = traj[keep]
    metrics = {
        "reward_mean": traj.rewards.mean().item(),
        "reward_std": traj.rewards.std(unbiased=False).item(),
        "reward_dropped": float(scored.num_dropped),
    }
    metrics.update(reward_metrics(scored))
    return traj, metrics
