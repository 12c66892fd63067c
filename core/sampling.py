"""The one sample → decode → score path, and its seeding rule.

Training rollouts, evaluation before/after training, `validate`/`test`/`predict`, `diffalign sample`,
`diffalign feedback` and the benchmarks all sample through `sample_batch` (and score through
`score_batch`), so they agree on what a (condition, seed) pair produces.

Seeding rule: every row has its own seed and its own `torch.Generator` seeded with it
(`row_generators`); every random draw of that row — its initial noise, its step noise, its particles'
or candidates' noise, its resampling — comes from that generator, in sampling order. A (condition,
seed) pair therefore gives the same sample in every command and at every batch size. Fixed sets of
pairs follow `seed_pairs` (prompt i, sample j → seed `first_seed + 1000·i + j`); training rollouts draw
their row seeds from the run's generator (`draw_seeds`), whose state is checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffalign.core.reward import (
    GuardedReward,
    Reward,
    RewardError,
    RewardShapeError,
    RewardUnavailableError,
    SampleView,
    ScoredBatch,
)
from diffalign.core.types import Cond, Trajectory, as_cond

#: seeds are drawn below this bound (fits every generator's 64-bit seed and JSON's exact integers)
SEED_BOUND = 2**53


def row_generators(seeds: Sequence[int], device: torch.device | str | None = None) -> list[torch.Generator]:
    """One generator per row, seeded with the row's seed (on `device`, CPU by default)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]


def policy_generators(policy: Any, seeds: Sequence[int]) -> list[torch.Generator]:
    """`row_generators(seeds)` on the policy's `generator_device` (its GPU, unless it opts out)."""
    return row_generators(seeds, getattr(policy, "generator_device", None))


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """n row seeds drawn from a run's generator (training rollouts)."""
    return draw_seeds_tensor(generator, n).tolist()


def draw_seeds_tensor(generator: torch.Generator, n: int) -> Tensor:
    """`draw_seeds` as an int64 tensor."""
    return torch.randint(0, SEED_BOUND, (n,), generator=generator, dtype=torch.int64)


def seed_pairs(prompts: Sequence[Any], seeds_per_prompt: int, first_seed: int) -> list[tuple[Any, int]]:
    """The fixed (prompt, seed) pairs of an evaluation or sampling set: prompt i, sample j → seed
    `first_seed + 1000·i + j` (the same pairs in every command)."""
    return [(p, first_seed + 1000 * i + j) for i, p in enumerate(prompts) for j in range(seeds_per_prompt)]


def repeat_generators(generator: Any, n: int) -> Any:
    """Per-row generators for rows repeated n times in place (particles, candidates): each row's n copies
    draw from that row's generator in turn. A single generator (or None) is returned as is."""
    if generator is None or isinstance(generator, torch.Generator) or n == 1:
        return generator
    return [g for g in generator for _ in range(n)]


def per_row_multinomial(probs: Tensor, num: int, generator: Any, replacement: bool = False) -> Tensor:
    """`torch.multinomial` of each row of `probs` (R, K); with a list of R generators row r draws from
    generator r (the seeding rule), else all rows from the one generator. Returns CPU indices."""
    p = probs.detach().float()
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else p.device
        return torch.multinomial(p.to(dev), num, replacement=replacement, generator=generator).cpu()
    gens = list(generator)
    if len(gens) != p.shape[0]:
        raise ValueError(f"got {len(gens)} generators for {p.shape[0]} rows")
    # each row draws on its generator's device (a GPU generator cannot draw CPU tensors)
    rows = [
        torch.multinomial(p[i : i + 1].to(g.device), num, replacement=replacement, generator=g).cpu()
        for i, g in enumerate(gens)
    ]
    return torch.cat(rows, dim=0) if rows else torch.zeros((0, num), dtype=torch.long)


@dataclass
class SampledBatch:
    """Final samples of one batch of conditions, and what it cost.

    Attributes:
        cond: the rows' conditioning.
        x0, mask: final samples in model space (x0 keeps its graph when sampled with grad_steps).
        view: the samples as rewards see them (decoded on demand).
        seeds: the rows' seeds.
        nfe_per_sample: denoiser rows evaluated per output sample (guidance counts 2 per step).
        trajectory: the stored trajectory (plain sampling only).
        extras: what a test-time method reports.
        scored: the guarded reward result after `score_batch` (None before).
    """

    cond: Cond
    x0: Tensor
    mask: Tensor | None
    view: SampleView
    seeds: list[int]
    nfe_per_sample: float
    trajectory: Trajectory | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    scored: ScoredBatch | None = None

    def __len__(self) -> int:
        return len(self.cond)

    @property
    def scores(self) -> Tensor:
        """(B,) rewards, NaN where the reward failed (after `score_batch`)."""
        if self.scored is None:
            raise RuntimeError("this batch has not been scored: call score_batch first")
        s = self.scored.scores.detach().float().clone()
        s[~self.scored.keep.to(s.device)] = float("nan")
        return s

    def samples(self) -> Any:
        """The decoded samples (the modality's full layout)."""
        return self.view.get({})


def sample_batch(
    policy: Any,
    cond: Cond,
    seeds: Sequence[int] | None = None,
    method: Any = None,
    reward: Reward | None = None,
    generator: Any = None,
    grad_steps: int | None = None,
    x_T: Tensor | None = None,
    mask: Tensor | None = None,
    hooks: Sequence[Any] = (),
    sde_window: tuple[int, int] | None = None,
    record_means: bool = False,
    num_steps: int | None = None,
) -> SampledBatch:
    """Sample one output per condition row.

    Args:
        policy: the `DiffusionPolicy`.
        cond: the rows' conditioning (`backbone.condition(batch)`).
        seeds: one seed per row (the seeding rule); or pass `generator` (a generator or a list).
        method: a `TestTimeMethod` (None: the plain sampler, with its trajectory kept).
        reward: what the method steers by (test-time methods only).
        grad_steps: keep the graph through the last K steps (plain sampling; reward backprop).
        x_T, mask: initial noise to start from (plain sampling; GRPO's shared noise).
        hooks: per-step `RolloutHook`s of the plain sampler (e.g. SPO's candidate judge).
        sde_window: (start, stop) of the only stochastic steps (plain sampling; `DiffusionPolicy.rollout`).
        record_means: keep the steps' Gaussian means in the trajectory (plain sampling; GRPO-Guard).
        num_steps: sampling steps of the plain sampler (default the policy's `num_steps`).

    Row generators live on `policy.generator_device` (the GPU when the policy is on one).
    """
    from diffalign.core.guidance.base import count_denoiser_rows

    cond = as_cond(cond)
    if seeds is not None:
        if len(seeds) != len(cond):
            raise ValueError(f"got {len(seeds)} seeds for {len(cond)} conditions")
        generator = policy_generators(policy, seeds)
    backbone = policy.backbone
    with count_denoiser_rows(backbone) as rows:
        if method is None:
            traj = policy.rollout(
                cond,
                generator,
                grad_steps=grad_steps,
                hooks=hooks,
                x_T=x_T,
                mask=mask,
                sde_window=sde_window,
                record_means=record_means,
                num_steps=num_steps,
            )
            x0, out_mask, extras = traj.x0, traj.mask, {}
        else:
            if reward is None:
                raise ValueError(f"{type(method).__name__} needs a reward to steer by")
            traj = None
            x0, out_mask, extras = method.sample(policy, cond, reward, generator)
            x0 = x0.detach()
    b = max(1, len(cond))
    # randomness of decode requests (one random frame) comes from the batch's seeds
    view_gen = torch.Generator().manual_seed(sum(int(s) for s in seeds) % SEED_BOUND) if seeds else None
    return SampledBatch(
        cond=cond if traj is None else traj.cond,
        x0=x0,
        mask=out_mask,
        view=SampleView(backbone, x0, out_mask, generator=view_gen),
        seeds=[int(s) for s in seeds] if seeds is not None else [],
        nfe_per_sample=rows[0] / b,
        trajectory=traj,
        extras=extras,
    )


def score_batch(batch: SampledBatch, reward: Reward | GuardedReward, on_invalid: str = "nan") -> ScoredBatch:
    """Score a sampled batch with `reward` and keep the result on it.

    `on_invalid`: "nan" (evaluation and sampling: failed rows become NaN and are counted, never raise —
    a reward of the wrong shape still raises), or a `GuardedReward` passed as `reward` applies its own
    policy (training: raise or drop).
    """
    if isinstance(reward, GuardedReward):
        scored = reward(batch.view, batch.cond)
    else:
        try:
            scored = GuardedReward(reward, on_invalid="drop")(batch.view, batch.cond)
        except (RewardShapeError, RewardUnavailableError):
            raise
        except RewardError as e:
            n = len(batch)
            scored = ScoredBatch(
                scores=torch.full((n,), float("nan")),
                keep=torch.zeros(n, dtype=torch.bool),
                info={},
                reasons={i: str(e) for i in range(n)},
            )
    batch.scored = scored
    return scored


def sample_pairs(
    policy: Any,
    pairs: Sequence[tuple[Any, int]],
    batch_size: int = 64,
    reward: Reward | None = None,
    method: Any = None,
    progress: bool = False,
    desc: str = "sampling",
) -> Iterator[SampledBatch]:
    """Sample (and, with a reward, score) fixed (prompt, seed) pairs, `batch_size` at a time, in order.

    Rows whose reward fails get NaN scores (counted by the caller). Runs without gradient.
    """
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc=desc, file=sys.stderr)
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            cond = policy.backbone.condition({"prompt": [p for p, _ in chunk]})
            with torch.no_grad():
                batch = sample_batch(policy, cond, [s for _, s in chunk], method=method, reward=reward)
                if reward is not None:
                    score_batch(batch, reward)
            if bar is not None:
                bar.update(len(chunk))
            yield batch
    finally:
        if bar is not None:
            bar.close()


def finite_mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values, None when there is none."""
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else None
