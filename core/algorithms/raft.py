"""RAFT: reward-ranked fine-tuning (best-of-n per condition, then supervised denoising on the winners).

Dong et al., "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
arXiv:2304.06767. For each condition of the batch draw `samples_per_condition` samples, keep the
`keep_top` best by reward, and train the standard denoising loss (`core.denoising`) on those winners
only, for `num_updates` optimiser steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.denoising import denoising_loss, noised_batch
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Batch


def select_top(rewards: Tensor, groups: Tensor, k: int) -> Tensor:
    """Indices of the k highest rewards within each group (groups with fewer rows keep all)."""
    keep = []
    for g in groups.unique():
        rows = (groups == g).nonzero().flatten()
        order = rewards[rows].argsort(descending=True)
        keep.append(rows[order[:k]])
    return torch.cat(keep).sort().values


class RAFT(Algorithm):
    """Best-of-n selection + supervised fine-tuning on the selected samples.

    Args:
        samples_per_condition: n, samples drawn per condition.
        keep_top: winners kept per condition.
        num_updates: optimiser steps on the winners per collected batch.
        cond_dropout: condition dropout of the denoising loss.
    """

    def __init__(
        self,
        samples_per_condition: int = 8,
        keep_top: int = 1,
        num_updates: int = 1,
        cond_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= keep_top <= samples_per_condition:
            raise ValueError(
                f"need 1 <= keep_top <= samples_per_condition, got {keep_top}, {samples_per_condition}"
            )
        self.samples_per_condition = samples_per_condition
        self.keep_top = keep_top
        self.num_updates = num_updates
        self.cond_dropout = cond_dropout

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[list[Batch], dict[str, float]]:
        traj, metrics = collect_rollouts(ctx, batch, self.samples_per_condition)
        idx = select_top(traj.rewards.cpu(), traj.extras["group"].cpu(), self.keep_top).to(traj.x0.device)
        winners = traj[idx]
        metrics["reward_selected_mean"] = float(ctx.ranks.gather(winners.rewards).mean())
        rows = ctx.rows(winners.batch_size, winners.event_shape)  # groups stay whole on their rank
        data = [
            noised_batch(
                ctx.policy,
                winners.x0,
                winners.cond,
                ctx.generator,
                winners.mask,
                None,
                self.cond_dropout,
                rows,
            )
            for _ in range(self.num_updates)
        ]
        return data, metrics

    def minibatches(self, data: list[Batch], generator: torch.Generator) -> Iterator[list[Batch]]:
        for d in data:
            yield [d]

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        return denoising_loss(policy, micro)
