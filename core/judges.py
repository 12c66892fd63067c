"""Pairwise preference judges: which of two samples of the same condition is better.

A `PairwiseJudge` returns P(first ≻ second) per pair (N,) in [0, 1] — a probability or a decision
(1, ½ for a tie, 0). Pref-GRPO (`core.algorithms.PrefGRPO`) turns a judge's verdicts inside a group
into win rates. A real judge is a pairwise model (a VLM asked "which image is better?"); `RewardJudge`
builds one from any scalar reward (Bradley–Terry on the score difference), which is also how a
pointwise reward model is compared pairwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffalign.core.reward import Reward, SampleView
from diffalign.core.types import Cond


class PairwiseJudge(nn.Module):
    """Base class: `forward(first, second, cond) -> (N,)` probability that `first` is preferred, for N pairs
    of decoded samples (`SampleView`s of equal length) sharing the conditions `cond`. Judges are frozen."""

    def forward(self, first: SampleView, second: SampleView, cond: Cond) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def freeze(self) -> PairwiseJudge:
        self.requires_grad_(False)
        return self.eval()


class RewardJudge(PairwiseJudge):
    """A judge from a scalar reward: P(a ≻ b) = σ((r_a − r_b)/temperature); with temperature 0 the verdict
    is hard — 1 if r_a > r_b, ½ if equal, 0 otherwise (Pref-GRPO scores ties as ½ to each).

    Args:
        reward: the scorer.
        temperature: the Bradley–Terry temperature (0: hard verdicts).
    """

    def __init__(self, reward: Reward, temperature: float = 0.0) -> None:
        super().__init__()
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.reward, self.temperature = reward.freeze(), temperature

    @torch.no_grad()
    def forward(self, first: SampleView, second: SampleView, cond: Cond) -> Tensor:
        a = self.reward.evaluate(first, cond).scores.float()
        b = self.reward.evaluate(second, cond).scores.float().to(a.device)
        if self.temperature == 0:
            return (a > b).float() + 0.5 * (a == b).float()
        return torch.sigmoid((a - b) / self.temperature)
