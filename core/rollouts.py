"""Online data for alignment: sample a batch of conditions with the current policy and score it.

`collect_rollouts` is the shared first step of every online method (DDPO, DPOK, GRPO, D3PO, RWR, RAFT):
no-grad sampling through `core.sampling` (one seed per row, drawn from the run's generator), scoring by
the guarded reward (NaN / raising / misshapen rewards stop or drop, as configured), and the bookkeeping
the methods need — prompt keys, group ids, per-term rewards and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.core.advantages import row_keys
from diffalign.core.distributed import SINGLE, Ranks, RowShard
from diffalign.core.functional import repeat_batch, repeat_rows
from diffalign.core.kernels import TransitionKernel
from diffalign.core.policy import DiffusionPolicy, RolloutHook
from diffalign.core.reward import TERM_PREFIX, GuardedReward, ScoredBatch, reward_metrics
from diffalign.core.sampling import draw_seeds_tensor, policy_generators, sample_batch, score_batch
from diffalign.core.types import Trajectory


@dataclass
class AlignContext:
    """What `Algorithm.prepare` may use: the policy, the guarded reward, the run's RNG and the device,
    and the run's processes.

    Attributes:
        generator: the run's generator. In a multi-process run it is the same stream on every rank, so
            draw from it only amounts every rank agrees on: draws for the rows of the global batch
            through `rows(n)` (`row_seeds`, `RowShard.draw`/`noise`) and fixed-size draws (a truncation
            depth, a step index).
        ranks: the run's processes (`core.distributed.Ranks`; one process by default).
        rank_generator: this rank's own stream, for draws sized by local data (shuffles); None: the run
            generator (one process).
        rollout_chunk_size: sample each rollout batch this many rows at a time (bounds sampling
            memory; None: all at once).
        async_reward: with chunks, decode each chunk and score it in a worker thread while the next
            chunk samples (a remote reward, JPEG, RDKit). The samples are the same with or without
            chunks (every row has its own seed; batched matmuls of another size round differently,
            ~1e-6); so are the scores, unless the reward's decode request is random (its generator is
            seeded per scored batch). Under `on_invalid="drop"` a chunk whose rows all fail raises, as a
            whole batch would.
    """

    policy: DiffusionPolicy
    reward: GuardedReward | None
    generator: torch.Generator
    device: torch.device
    ranks: Ranks = SINGLE
    rank_generator: torch.Generator | None = None
    rollout_chunk_size: int | None = None
    async_reward: bool = False

    @property
    def local_generator(self) -> torch.Generator:
        """The stream for draws sized by this rank's data (the run generator with one process)."""
        return self.rank_generator if self.rank_generator is not None else self.generator

    def rows(self, count: int, event: Sequence[int] | None = None) -> RowShard:
        """Where this rank's `count` rows sit in the global batch (a collective with several ranks)."""
        return self.ranks.rows(count, event)

    def row_seeds(self, count: int) -> list[int]:
        """One sampling seed for each of this rank's `count` rows: the global batch's seeds are drawn
        from the run generator and each rank keeps its own (one process: `draw_seeds(generator, n)`)."""
        return self.rows(count).draw(lambda total: draw_seeds_tensor(self.generator, total)).tolist()


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

    `ctx.rollout_chunk_size` / `ctx.async_reward` sample in chunks and score them in a worker thread (see
    `AlignContext`); the policy's `rollout_steps` sets the number of sampling steps.

    Returns the kept trajectories with `rewards` set and, in `extras`: `key` (the prompt key of each
    row), `group` (the index of the condition it came from), `seed` and `reward_terms` (per-sample terms
    of a composite reward, for Pareto comparisons); and the metrics `reward_mean`, `reward_std` (over
    the global batch: every rank's kept rows), `reward_dropped` (this rank's) and `reward/<info>` means.

    Row seeds come from `ctx.row_seeds`: with several ranks, each rank samples its own rows of the
    global batch, and the global batch is the one a single process would sample.
    """
    if ctx.reward is None:
        raise ValueError("collect_rollouts needs a reward")
    policy, backbone = ctx.policy, ctx.policy.backbone
    rows = repeat_batch(dict(batch), repeat) if repeat > 1 else dict(batch)
    cond = backbone.condition(rows)
    seeds = ctx.row_seeds(len(cond))
    x_T = mask = None
    with torch.no_grad(), policy.sampling_with(kernel):
        if shared_noise and repeat > 1:
            first = cond[torch.arange(0, len(cond), repeat)]
            x_T, mask = backbone.init_noise(first, policy_generators(policy, seeds[::repeat]))
            x_T = repeat_rows(x_T, repeat)
            mask = repeat_rows(mask, repeat) if mask is not None else None
        options = {"sde_window": sde_window, "hooks": hooks, "record_means": record_means}
        traj, scored = _sample_and_score(ctx, cond, seeds, x_T, mask, options)
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
    every = ctx.ranks.gather(traj.rewards)  # statistics of the global batch
    metrics = {
        "reward_mean": every.mean().item(),
        "reward_std": every.std(unbiased=False).item(),
        "reward_dropped": float(scored.num_dropped),
    }
    metrics.update(reward_metrics(scored))
    return traj, metrics


def _sample_and_score(
    ctx: AlignContext,
    cond: Any,
    seeds: list[int],
    x_T: Tensor | None,
    mask: Tensor | None,
    options: Mapping[str, Any],
) -> tuple[Trajectory, ScoredBatch]:
    """Sample the rows (in chunks of `ctx.rollout_chunk_size`) with the policy's `rollout_steps` and score
    each chunk, in a worker thread with `ctx.async_reward`."""
    policy, n = ctx.policy, len(cond)
    size = min(ctx.rollout_chunk_size or n, n)
    if size < 1:
        raise ValueError(f"rollout_chunk_size must be >= 1, got {ctx.rollout_chunk_size}")
    pool = ThreadPoolExecutor(max_workers=1) if ctx.async_reward and size < n else None
    request = getattr(ctx.reward.reward, "request", None) or {}
    trajs, scores = [], []
    try:
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            sampled = sample_batch(
                policy,
                cond[torch.arange(rows.start, rows.stop)] if size < n else cond,
                seeds[rows],
                x_T=None if x_T is None else x_T[rows],
                mask=None if mask is None else mask[rows],
                num_steps=policy.rollout_steps,
                **options,
            )
            trajs.append(sampled.trajectory)
            if pool is None:
                scores.append(score_batch(sampled, ctx.reward))
            else:  # one scorer thread: the guarded reward's counts stay right
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
