"""The standard diffusion loss on data: pretrains base models (and fine-tunes on curated samples).

loss = E‖f_θ(x_t, t, c) − target‖², with (x_t, t, target) drawn by the kernel for the backbone's
prediction type (ε, v, x0 or flow velocity; `core.denoising`). With `cond_dropout` > 0 the condition is
replaced by the null condition at that rate, so classifier-free guidance works at sampling time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.denoising import denoising_loss, noised_batch
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext
from diffalign.core.types import Batch


class SupervisedDenoising(Algorithm):
    """Denoising score matching / flow matching on samples from the data batch.

    The batch must hold the samples under `sample_key` (in the modality's sample layout; the backbone's
    `encode` maps them to model space) plus the conditions under "prompt".

    Args:
        cond_dropout: probability of replacing a row's condition by the null condition.
        sample_key: batch key of the samples.
    """

    needs_reward = False
    progress_metric = "loss"

    def __init__(self, cond_dropout: float = 0.1, sample_key: str = "sample") -> None:
        super().__init__()
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.cond_dropout = cond_dropout
        self.sample_key = sample_key

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        if self.sample_key not in batch:
            raise KeyError(
                f"SupervisedDenoising needs samples under batch key {self.sample_key!r}; "
                f"the batch has {sorted(batch)}"
            )
        backbone = ctx.policy.backbone
        x0, mask = backbone.encode(batch[self.sample_key])
        cond = backbone.condition(batch)
        rows = ctx.rows(len(x0), x0.shape[1:])  # the global batch's noise; this rank's rows of it
        data = noised_batch(
            ctx.policy, x0.to(ctx.device), cond, ctx.generator, mask, None, self.cond_dropout, rows
        )
        return data, {}

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        return denoising_loss(policy, micro)
