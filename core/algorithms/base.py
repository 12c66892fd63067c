"""The algorithm contract: collect data, split it into optimiser steps, compute a loss with named terms."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward


@dataclass
class AlignContext:
    """What `Algorithm.prepare` may use: the policy, the guarded reward, and the run's RNG."""

    policy: DiffusionPolicy
    reward: GuardedReward | None
    generator: torch.Generator
    device: torch.device


class Algorithm(nn.Module):
    """One alignment method (one file per method under `core/algorithms/`).

    Hyperparameters go in `__init__` (its signature is the recipe schema). The training loop calls:

    1. `prepare(ctx, batch) -> (data, metrics)`: e.g. a no-grad rollout and its rewards.
    2. `minibatches(data, generator)`: yields one list of micro-batches per optimiser step; the loop
       back-propagates each micro-batch's loss divided by the list length, then steps.
    3. `forward(policy, micro) -> {"loss": ..., other named scalars}`: every term is logged.

    Set `needs_reference` for methods that compare with the frozen base model, `needs_reward` to
    False for methods that learn from data alone, and `needs_differentiable_reward` for methods that
    back-propagate through the reward.
    """

    needs_reference: bool = False
    needs_reward: bool = True
    needs_differentiable_reward: bool = False

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError

    def minibatches(self, data: Any, generator: torch.Generator) -> Iterator[list[Any]]:
        yield [data]

    def forward(self, policy: DiffusionPolicy, micro: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    # Algorithms with running state (e.g. per-prompt reward buffers) override these two; the state
    # travels inside the Lightning checkpoint through nn.Module's extra-state hook.
    def algorithm_state(self) -> dict[str, Any]:
        return {}

    def load_algorithm_state(self, state: dict[str, Any]) -> None:
        pass

    def get_extra_state(self) -> dict[str, Any]:
        return self.algorithm_state()

    def set_extra_state(self, state: Any) -> None:
        if state:
            self.load_algorithm_state(state)


def prompt_keys(batch: Mapping[str, Any], cond: Mapping[str, Tensor], batch_size: int) -> list[str]:
    """Group key per row: the batch's prompts when present, else a hash of the conditioning."""
    from diffalign.core.reward import cond_keys

    prompts = batch.get("prompt") if isinstance(batch, Mapping) else None
    if prompts is not None and len(prompts) == batch_size:
        return [str(p.item() if isinstance(p, Tensor) else p) for p in prompts]
    return cond_keys(dict(cond), batch_size)
