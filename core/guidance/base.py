"""Test-time alignment: methods that change sampling, not weights.

A `TestTimeMethod` turns (policy, conditions, reward, generator) into one final sample per condition
and reports how many denoiser evaluations (NFE) each output cost, so that methods can be compared at
equal compute. NFE counts rows passed through `backbone.denoise` per output sample (classifier-free
guidance therefore counts 2 per step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffalign.core.backbone import Backbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import Reward
from diffalign.core.types import Cond


@dataclass
class SampleResult:
    """Final samples of a test-time method: model space `x0`, decoded `samples`, `scores`, and NFE."""

    x0: Tensor
    mask: Tensor | None
    samples: Any
    scores: Tensor
    nfe_per_sample: float
    extras: dict[str, Any] = field(default_factory=dict)


@contextmanager
def count_denoiser_rows(backbone: Backbone) -> Iterator[list[int]]:
    """Count rows passed through `backbone.denoise` inside the block (a one-element list)."""
    counter = [0]
    original = backbone.denoise

    def counted(x_t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        counter[0] += x_t.shape[0]
        return original(x_t, *args, **kwargs)

    backbone.denoise = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        del backbone.denoise


def score(reward: Reward, policy: DiffusionPolicy, x0: Tensor, mask: Tensor | None, cond: Cond) -> Tensor:
    """Reward of model-space samples; NaN/inf scores become −inf so they are never selected."""
    out = reward(policy.backbone.decode(x0, mask), cond).scores.float().reshape(-1)
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("-inf")))


def repeat_cond(cond: Cond, n: int) -> Cond:
    """Repeat every condition row n times (row i → rows i·n … i·n+n−1)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def pick(x: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if x is None else x[idx]


def group_argmax(values: Tensor, group_size: int) -> Tensor:
    """Row index of the best value in each consecutive group of `group_size` rows."""
    v = values.reshape(-1, group_size)
    best = torch.nan_to_num(v, nan=float("-inf")).argmax(dim=1)
    return torch.arange(v.shape[0], device=values.device) * group_size + best


class TestTimeMethod:
    """Base class. Subclasses implement `_sample` returning final (x0, mask, extras) per condition."""

    def __call__(
        self, policy: DiffusionPolicy, cond: Cond, reward: Reward, generator: torch.Generator | None = None
    ) -> SampleResult:
        b = next(iter(cond.values())).shape[0]
        with count_denoiser_rows(policy.backbone) as rows:
            x0, mask, extras = self._sample(policy, cond, reward, generator)
        with torch.no_grad():
            samples = policy.backbone.decode(x0.detach(), mask)
            scores = reward(samples, cond).scores.detach().float().reshape(-1)
        return SampleResult(x0.detach(), mask, samples, scores, rows[0] / b, extras)

    def _sample(
        self, policy: DiffusionPolicy, cond: Cond, reward: Reward, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        raise NotImplementedError


class PlainSampling(TestTimeMethod):
    """The base sampler, unchanged (the reference point of every comparison)."""

    @torch.no_grad()
    def _sample(self, policy, cond, reward, generator):
        traj = policy.rollout(cond, generator)
        return traj.x0, traj.mask, {}


class BestOfN(TestTimeMethod):
    """Draw `n` samples per condition and keep the one with the highest reward.

    Args:
        n: samples per condition (cost: n plain samples).
    """

    def __init__(self, n: int = 4) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n

    @torch.no_grad()
    def _sample(self, policy, cond, reward, generator):
        traj = policy.rollout(repeat_cond(cond, self.n), generator)
        scores = score(reward, policy, traj.x0, traj.mask, repeat_cond(cond, self.n))
        idx = group_argmax(scores, self.n)
        return traj.x0[idx], pick(traj.mask, idx), {"candidate_scores": scores.reshape(-1, self.n)}
