"""Online data for alignment: sample a batch of conditions with the current policy and score it.

`collect_rollouts` is the shared first step of every online method (DDPO, DPOK, GRPO, D3PO, RWR, RAFT):
no-grad sampling through `core.sampling` (one seed per row, drawn from the run's generator), scoring by
the guarded reward (NaN / raising / misshapen rewards stop or drop, as configured), and the bookkeeping
the methods need — prompt keys, group ids, per-term rewards and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.core.advantages import row_keys
from diffalign.core.functional import repeat_batch, repeat_rows
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import TERM_PREFIX, GuardedReward, ScoredBatch, reward_metrics
from diffalign.core.sampling import draw_seeds, policy_generators, sample_batch, score_batch
from diffalign.core.types import Cond, Trajectory


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
    chunk_size: int | None = None,
    async_reward: bool = False,
) -> tuple[Trajectory, dict[str, float]]:
    """No-grad rollouts of a batch of conditions (each repeated `repeat` times), scored by the guarded
    reward; rows whose reward was dropped are removed.

    With `shared_noise`, the `repeat` samples of a condition start from the same x_T (GRPO's and
    D3PO's option) and differ only in their step noise.

    `chunk_size` samples the rows that many at a time (bounds sampling memory); with `async_reward` each
    chunk is decoded and then scored in a worker thread while the next chunk samples (worth it when the
    reward is slow CPU work: JPEG, RDKit, an external scorer). Every row keeps its own seed, so the
    samples and rewards are the same with or without chunks. Under `on_invalid="drop"` a chunk whose rows
    all fail raises, as a whole batch would.

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
    with torch.no_grad():
        if shared_noise and repeat > 1:
            first = cond[torch.arange(0, len(cond), repeat)]
            x_T, mask = backbone.init_noise(first, policy_generators(policy, seeds[::repeat]))
            x_T = repeat_rows(x_T, repeat)
            mask = repeat_rows(mask, repeat) if mask is not None else None
        traj, scored = _sample_and_score(ctx, cond, seeds, x_T, mask, chunk_size, async_reward)
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


def _sample_and_score(
    ctx: AlignContext,
    cond: Cond,
    seeds: list[int],
    x_T: Tensor | None,
    mask: Tensor | None,
    chunk_size: int | None,
    async_reward: bool,
) -> tuple[Trajectory, ScoredBatch]:
    """Sample `cond` (in chunks of `chunk_size` rows) and score each chunk, in a worker thread if asked."""
    policy, n = ctx.policy, len(cond)
    size = chunk_size or n
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pool = ThreadPoolExecutor(max_workers=1) if async_reward else None
    request = getattr(ctx.reward.reward, "request", None) or {}
    trajs, scores = [], []
    try:
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            idx = torch.arange(rows.start, rows.stop)
            sampled = sample_batch(
                policy,
                cond[idx] if size < n else cond,
                seeds[rows],
                x_T=None if x_T is None else x_T[rows],
                mask=None if mask is None else mask[rows],
                num_steps=policy.rollout_steps,
            )
            trajs.append(sampled.trajectory)
            if pool is None:
                scores.append(score_batch(sampled, ctx.reward))
            else:
                sampled.view.get(request)  # decode here, on the sampler's device; the thread only scores
                scores.append(pool.submit(_score_without_grad, sampled, ctx.reward))
        scores = [s.result() if isinstance(s, Future) else s for s in scores]
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if len(trajs) == 1:
        return trajs[0], scores[0]
    return Trajectory.cat(trajs), _cat_scored(scores)


def _score_without_grad(sampled: Any, reward: GuardedReward) -> ScoredBatch:
    with torch.no_grad():  # grad mode is per thread
        return score_batch(sampled, reward)


def _cat_scored(parts: list[ScoredBatch]) -> ScoredBatch:
    """The ScoredBatch of consecutive chunks: per-sample entries concatenated, reasons re-indexed."""
    sizes = [p.scores.shape[0] for p in parts]
    offsets = [sum(sizes[:i]) for i in range(len(parts))]
    info: dict[str, Any] = {}
    for name in parts[0].info:
        values = [torch.as_tensor(p.info[name]) for p in parts]
        per_sample = all(v.dim() >= 1 and v.shape[0] == s for v, s in zip(values, sizes, strict=True))
        info[name] = torch.cat([v.cpu() for v in values]) if per_sample else values[0]
    elements = None if parts[0].elements is None else torch.cat([p.elements for p in parts])
    return ScoredBatch(
        scores=torch.cat([p.scores for p in parts]),
        keep=torch.cat([p.keep for p in parts]),
        info=info,
        reasons={i + off: r for p, off in zip(parts, offsets, strict=True) for i, r in p.reasons.items()},
        elements=elements,
    )
