"""Test-time alignment: methods that change sampling, not weights.

A `TestTimeMethod` turns (policy, conditions, reward, generator) into one final sample per condition
(`sample`); `core.sampling.sample_batch` runs it inside the project's one sampling path and reports how
many denoiser evaluations (NFE) each output cost, so that methods can be compared at equal compute.
NFE counts rows passed through `backbone.denoise` per output sample (classifier-free guidance therefore
counts 2 per step).

Randomness follows the seeding rule of `core.sampling`: `generator` is one generator per condition row
(or a single generator); a row's particles and candidates draw from their row's generator
(`repeat_generators`), so a (condition, seed) pair gives the same output at any batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from diffalign.core.backbone import Backbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import Reward, SampleView
from diffalign.core.sampling import repeat_generators
from diffalign.core.types import Cond, as_cond


@contextmanager
def count_denoiser_rows(backbone: Backbone) -> Iterator[list[int]]:
    """Count rows passed through `backbone.denoise` inside the block (a one-element list)."""
    counter = [0]
    original = backbone.denoise
    patched_before = "denoise" in vars(backbone)  # someone else's wrapper: put it back afterwards

    def counted(x_t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        counter[0] += x_t.shape[0]
        return original(x_t, *args, **kwargs)

    backbone.denoise = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        if patched_before:
            backbone.denoise = original  # type: ignore[method-assign]
        else:
            del backbone.denoise


def score(reward: Reward, policy: DiffusionPolicy, x0: Tensor, mask: Tensor | None, cond: Cond) -> Tensor:
    """Reward of model-space samples (through `SampleView`, honouring the reward's decode request);
    NaN/inf scores become −inf so they are never selected."""
    out = reward.evaluate(SampleView(policy.backbone, x0, mask), as_cond(cond, x0.shape[0])).scores.float()
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("-inf")))


def pick(x: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if x is None else x[idx]


def group_argmax(values: Tensor, group_size: int) -> Tensor:
    """Row index of the best value in each consecutive group of `group_size` rows."""
    v = values.reshape(-1, group_size)
    best = torch.nan_to_num(v, nan=float("-inf")).argmax(dim=1)
    return torch.arange(v.shape[0], device=values.device) * group_size + best


class TestTimeMethod:
    """Base class. Subclasses implement `sample` returning final (x0, mask, extras) per condition row.

    Calling a method, `method(policy, cond, reward, generator)`, samples and scores through
    `core.sampling` and returns a scored `SampledBatch` (`.x0`, `.scores`, `.nfe_per_sample`, `.extras`).
    """

    def sample(
        self, policy: DiffusionPolicy, cond: Cond, reward: Reward, generator: Any
    ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, policy: DiffusionPolicy, cond: Cond, reward: Reward, generator: Any = None) -> Any:
        from diffalign.core.sampling import sample_batch, score_batch

        batch = sample_batch(policy, cond, method=self, reward=reward, generator=generator)
        with torch.no_grad():
            score_batch(batch, reward)
        return batch


class PlainSampling(TestTimeMethod):
    """The base sampler, unchanged (the reference point of every comparison)."""

    @torch.no_grad()
    def sample(self, policy, cond, reward, generator):
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
    def sample(self, policy, cond, reward, generator):
        cond_n = cond.repeat_interleave(self.n)
        traj = policy.rollout(cond_n, repeat_generators(generator, self.n))
        scores = score(reward, policy, traj.x0, traj.mask, cond_n)
        idx = group_argmax(scores, self.n)
        return traj.x0[idx], pick(traj.mask, idx), {"candidate_scores": scores.reshape(-1, self.n)}
