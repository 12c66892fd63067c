"""RWR: reward-weighted regression on the model's own samples.

Lee et al., "Aligning Text-to-Image Models using Human Feedback", arXiv:2302.12192, and the RWR
baseline of DDPO (Black et al.). Sample without grad, score, and train the standard denoising loss on
the samples with weights w_i ∝ exp(r_i / temperature), normalised to mean 1 over the batch (the global
batch when several processes train), so the learning rate means the same at any temperature. As
temperature → ∞ this is plain self-distillation; small temperatures approach training on the best
sample only.
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


def reward_weights(rewards: Tensor, temperature: float) -> Tensor:
    """softmax(r / temperature) scaled to mean 1."""
    return torch.softmax(rewards.float() / temperature, dim=0) * rewards.numel()


class RWR(Algorithm):
    """Reward-weighted denoising loss on own samples.

    Args:
        temperature: β in exp(r/β); smaller concentrates the weight on the best samples.
        samples_per_condition: samples drawn per condition of the batch.
        num_updates: optimiser steps per collected batch (fresh timesteps and noise each).
        cond_dropout: condition dropout of the denoising loss (keeps CFG working).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        samples_per_condition: int = 1,
        num_updates: int = 1,
        cond_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.samples_per_condition = samples_per_condition
        self.num_updates = num_updates
        self.cond_dropout = cond_dropout

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[list[Batch], dict[str, float]]:
        traj, metrics = collect_rollouts(ctx, batch, self.samples_per_condition)
        # weights over the global batch (every rank's samples); each rank trains on its own rows
        rows = ctx.rows(traj.batch_size, traj.event_shape)
        every = reward_weights(ctx.ranks.gather(traj.rewards), self.temperature).to(traj.x0.device)
        w = rows.take(every)
        metrics["weight_max"] = float(every.max())
        metrics["effective_samples"] = float(every.sum() ** 2 / (every**2).sum())
        norm = every.sum() / ctx.ranks.world_size if ctx.ranks.distributed else None
        data = [
            noised_batch(
                ctx.policy, traj.x0, traj.cond, ctx.generator, traj.mask, w, self.cond_dropout, rows, norm
            )
            for _ in range(self.num_updates)
        ]
        return data, metrics

    def minibatches(self, data: list[Batch], generator: torch.Generator) -> Iterator[list[Batch]]:
        for d in data:
            yield [d]

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        return denoising_loss(policy, micro)
