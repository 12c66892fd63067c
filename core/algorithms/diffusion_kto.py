"""Diffusion-KTO: alignment from unpaired good/bad labels (Kahneman–Tversky optimisation).

Li et al., "Aligning Diffusion Models by Optimizing Human Utility", arXiv:2404.04465. Each sample has
a binary label (desirable / undesirable). Its implicit reward at a random (t, ε) is

    r = −β · (‖f_θ(x_t) − target‖² − ‖f_ref(x_t) − target‖²)     (errors averaged over event dims)

and, with a reference point z = max(0, mean r over the batch) (detached; a simple estimate of the
policy–reference KL, as in KTO's batch estimate), the loss is

    desirable:   λ_D · (1 − σ(r − z))        undesirable:   λ_U · (1 − σ(z − r)).

At θ = ref every r = 0 and the loss is (λ_D·n_D + λ_U·n_U)/(2n). The batch holds `sample` (the modality's
layout), `label` (1 desirable, 0 undesirable) and the conditioning keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.denoising import denoising_errors
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext
from diffalign.core.types import Batch


def kto_loss(
    r: Tensor,
    label: Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    batch_mean: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample KTO loss for implicit rewards `r` and 0/1 labels; returns (losses, reference point).

    The reference point is max(0, mean r) over the batch (`batch_mean`: that mean over the global batch
    when several ranks train)."""
    z = (r.detach().mean() if batch_mean is None else batch_mean.to(r.device)).clamp_min(0)
    good = label > 0.5
    loss = torch.where(
        good, desirable_weight * (1 - torch.sigmoid(r - z)), undesirable_weight * (1 - torch.sigmoid(z - r))
    )
    return loss, z


class DiffusionKTO(Algorithm):
    """KTO on labelled single samples.

    Args:
        beta: scale of the implicit reward.
        desirable_weight, undesirable_weight: λ_D and λ_U (raise one when the labels are unbalanced).
    """

    needs_reference = True
    needs_reward = False

    def __init__(
        self, beta: float = 5000.0, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        if "sample" not in batch or "label" not in batch:
            raise KeyError(f"DiffusionKTO needs 'sample' and 'label' in the batch; it has {sorted(batch)}")
        backbone = ctx.policy.backbone
        x0, mask = backbone.encode(batch["sample"])
        x0 = x0.to(ctx.device).float()
        rows = ctx.rows(len(x0), x0.shape[1:])
        x_t, t, target = ctx.policy.kernel.training_sample(x0, ctx.generator, mask, rows)
        label = torch.as_tensor(batch["label"], dtype=torch.float32, device=x0.device)
        metrics = {"desirable_fraction": float((label > 0.5).float().mean())}
        micro = Batch(
            x_t=x_t,
            t=t,
            target=target,
            cond=backbone.condition(batch),
            mask=mask,
            label=label,
            ranks=ctx.ranks,
        )
        return micro, metrics

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        err, ref_err = denoising_errors(policy, micro.x_t, micro.t, micro.cond, micro.target, micro.mask)
        r = -self.beta * (err - ref_err)
        ranks = micro.get("ranks")
        mean_r = ranks.gather(r.detach()).mean() if ranks is not None else None  # the global batch's
        loss, z = kto_loss(r, micro.label, self.desirable_weight, self.undesirable_weight, mean_r)
        good = micro.label > 0.5
        return {
            "loss": loss.mean(),
            "reference_point": z,
            "reward_desirable": r.detach()[good].mean() if good.any() else torch.tensor(0.0),
            "reward_undesirable": r.detach()[~good].mean() if (~good).any() else torch.tensor(0.0),
        }
