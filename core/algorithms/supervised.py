"""The standard diffusion loss on data: pretrains base models; RAFT reuses it on selected samples.

loss = E‖f_θ(x_t, t, c) − target‖², with (x_t, t, target) drawn by the kernel for the backbone's
prediction type (ε, v, x0 or flow velocity). With `cond_dropout` > 0 the condition is replaced by the
null condition at that rate, so classifier-free guidance works at sampling time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.functional import masked_mse
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Cond


@dataclass
class DenoisingBatch:
    """Noisy inputs and targets for one supervised step."""

    x_t: Tensor
    t: Tensor
    target: Tensor
    cond: Cond
    mask: Tensor | None = None
    weight: Tensor | None = None
    x0: Tensor | None = None  # the clean samples (kept for inspection; not used by the loss)


class SupervisedDenoising(Algorithm):
    """Denoising score matching / flow matching on samples from the data batch.

    The batch must hold the samples under `sample_key` (in the modality's sample layout; the backbone's
    `encode` maps them to model space) plus whatever `encode_condition` reads.

    Args:
        cond_dropout: probability of replacing a row's condition by the null condition.
        sample_key: batch key of the samples.
    """

    needs_reward = False

    def __init__(self, cond_dropout: float = 0.1, sample_key: str = "sample") -> None:
        super().__init__()
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.cond_dropout = cond_dropout
        self.sample_key = sample_key

    def make_batch(
        self,
        policy: DiffusionPolicy,
        x0: Tensor,
        cond: Cond,
        generator: torch.Generator,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> DenoisingBatch:
        """Draw timesteps, noise and condition dropout for clean samples `x0` (model space)."""
        x_t, t, target = policy.kernel.training_sample(x0, generator)
        if self.cond_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator) < self.cond_dropout
            null = policy.backbone.null_condition(cond)
            cond = {
                k: torch.where(drop.to(v.device).reshape(-1, *([1] * (v.dim() - 1))), null[k], v)
                for k, v in cond.items()
            }
        return DenoisingBatch(x_t=x_t, t=t, target=target, cond=cond, mask=mask, weight=weight, x0=x0)

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[DenoisingBatch, dict[str, float]]:
        if self.sample_key not in batch:
            raise KeyError(
                f"SupervisedDenoising needs samples under batch key {self.sample_key!r}; "
                f"the batch has {sorted(batch)}"
            )
        backbone = ctx.policy.backbone
        encoded = backbone.encode(batch[self.sample_key])
        x0, mask = encoded if isinstance(encoded, tuple) else (encoded, None)
        cond = backbone.encode_condition(batch)
        return self.make_batch(ctx.policy, x0.to(ctx.device), cond, ctx.generator, mask), {}

    def forward(self, policy: DiffusionPolicy, micro: DenoisingBatch) -> dict[str, Tensor]:
        out = policy.backbone.denoise(micro.x_t, micro.t, micro.cond, micro.mask)
        per_sample = masked_mse(out, micro.target, micro.mask)
        if micro.weight is not None:
            loss = (per_sample * micro.weight).sum() / micro.weight.sum().clamp_min(1e-8)
        else:
            loss = per_sample.mean()
        return {"loss": loss}
