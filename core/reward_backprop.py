"""The loss of the reward-backpropagation family (DRaFT, AlignProp, ReFL): decode samples that keep
their autograd graph, score them with a differentiable reward, and minimise the negative reward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward, SampleView, reward_metrics
from diffalign.core.rollouts import AlignContext
from diffalign.core.types import Batch, Cond


def backprop_batch(ctx: AlignContext, batch: Mapping[str, Any]) -> Batch:
    """The micro-batch of a reward-backprop step: the conditions, one sampling seed per row (this rank's
    rows of the global batch, `AlignContext.row_seeds`), and the guarded reward, the run generator (for
    draws every rank makes alike: a truncation depth, a step index) and the run's processes passed
    through."""
    cond = ctx.policy.backbone.condition(batch)
    seeds = torch.tensor(ctx.row_seeds(len(cond)), dtype=torch.int64)
    return Batch(cond=cond, seed=seeds, reward=ctx.reward, generator=ctx.generator, ranks=ctx.ranks)


def reward_loss(
    policy: DiffusionPolicy,
    reward: GuardedReward,
    x0: Tensor,
    mask: Tensor | None,
    cond: Cond,
    scale: float,
    hinge: float | None = None,
) -> dict[str, Tensor]:
    """Decode `x0` (with its graph), score it, and return scale·(−mean(r)) (or scale·mean(ReLU(h − r)))
    over the samples the guard keeps, with `reward_mean`, `reward_std`, `reward_dropped` and the
    reward's per-sample info."""
    scored = reward(SampleView(policy.backbone, x0, mask), cond)
    r = scored.scores[scored.keep.to(scored.scores.device)]
    if not r.requires_grad:
        raise RuntimeError("the reward returned scores without a gradient; is it really differentiable?")
    loss = torch.relu(hinge - r).mean() if hinge is not None else -r.mean()
    out = {
        "loss": scale * loss,
        "reward_mean": r.detach().mean(),
        "reward_std": r.detach().std(unbiased=False),
        "reward_dropped": torch.tensor(float(scored.num_dropped)),
    }
    out.update({k: torch.tensor(v) for k, v in reward_metrics(scored).items()})
    return out
