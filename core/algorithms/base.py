"""The algorithm contract: collect data, split it into optimiser steps, compute a loss with named terms."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext

__all__ = ["AlignContext", "Algorithm"]


class Algorithm(nn.Module):
    """One alignment method (one file per method under `core/algorithms/`).

    Hyperparameters go in `__init__` (its signature is the recipe schema). The training loop calls:

    1. `prepare(ctx, batch) -> (data, metrics)`: e.g. a no-grad rollout and its rewards.
    2. `minibatches(data, generator)`: yields one list of micro-batches per optimiser step; the loop
       back-propagates each micro-batch's loss divided by the list length, then steps.
    3. `forward(policy, micro) -> {"loss": ..., other named scalars}`: every term is logged.

    Data and micro-batches are `core.types.Batch` (or `Trajectory`) containers.

    Attributes:
        needs_reference: the method compares with the frozen base model (KL, DPO).
        needs_reward: False for methods that learn from data alone.
        needs_differentiable_reward: the method back-propagates through the reward.
        metric_reduction: how a named term of `forward` is aggregated over the micro-batches of one
            training batch — "mean" (the default for unnamed terms), "max", "sum", "last", or
            "first_max" (the max over the first optimiser step only, e.g. the ratio-consistency check).
        progress_metric: the metric the progress bar shows (`reward_mean` when prepare reports it,
            else `loss`).
    """

    needs_reference: bool = False
    needs_reward: bool = True
    needs_differentiable_reward: bool = False
    metric_reduction: ClassVar[dict[str, str]] = {}
    progress_metric: ClassVar[str] = "reward_mean"

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
