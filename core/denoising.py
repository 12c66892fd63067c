"""The denoising loss on clean samples, shared by pretraining, reward-weighted and preference methods.

`noised_batch` draws one timestep and masked noise per sample (`kernel.training_sample`) and optional
condition dropout to the null condition (so classifier-free guidance keeps working); `denoising_loss`
is the (weighted) mean squared error of the model output against the kernel's target for the
backbone's prediction type (ε, v, x0 or flow velocity); `denoising_errors` gives the per-sample errors
of the policy and of the frozen reference, the quantity Diffusion-DPO and Diffusion-KTO compare.
Errors average over real (unmasked) event entries only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.core.distributed import RowShard
from diffalign.core.functional import masked_mse
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Batch, Cond


def drop_conditions(
    policy: DiffusionPolicy,
    cond: Cond,
    rate: float,
    generator: torch.Generator,
    rows: RowShard | None = None,
) -> Cond:
    """`cond` with each row replaced by the null condition with probability `rate` (seeded; with `rows`,
    drawn for the global batch and cut to this rank's rows)."""
    if rate <= 0:
        return cond
    rows = rows if rows is not None else RowShard(0, len(cond), len(cond))
    drop = rows.draw(lambda n: torch.rand(n, generator=generator)) < rate
    return cond.where(drop, cond.replace(**dict(policy.backbone.null_condition(cond))))


def noised_batch(
    policy: DiffusionPolicy,
    x0: Tensor,
    cond: Cond,
    generator: torch.Generator,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    cond_dropout: float = 0.0,
    rows: RowShard | None = None,
    weight_norm: Tensor | None = None,
) -> Batch:
    """A micro-batch for the denoising loss: `x_t`, `t`, `target`, `cond`, `mask`, `weight`, `x0`.

    `rows`: this rank's rows of the global batch (`AlignContext.rows`), so noise, timesteps and condition
    dropout are the global batch's. `weight_norm`: what the weighted loss divides by (default: the
    weights' sum; with several ranks, the global sum over the number of ranks, so that the average of
    the ranks' gradients is the gradient of the global weighted mean).
    """
    x_t, t, target = policy.kernel.training_sample(x0, generator, mask, rows)
    cond = drop_conditions(policy, cond, cond_dropout, generator, rows)
    if weight is not None and weight_norm is None:
        weight_norm = weight.sum()
    return Batch(
        x_t=x_t, t=t, target=target, cond=cond, mask=mask, weight=weight, weight_norm=weight_norm, x0=x0
    )


def denoising_loss(policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
    """E‖f_θ(x_t, t, c) − target‖² over the micro-batch (weighted by `micro.weight` when set)."""
    out = policy.backbone.denoise(micro.x_t, micro.t, micro.cond, micro.mask)
    per_sample = masked_mse(out, micro.target, micro.mask)
    if micro.weight is not None:
        loss = (per_sample * micro.weight).sum() / micro.weight_norm.clamp_min(1e-8)
    else:
        loss = per_sample.mean()
    return {"loss": loss}


def denoising_errors(
    policy: DiffusionPolicy, x_t: Tensor, t: Tensor, cond: Cond, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-sample denoising errors (B,) of the policy (with grad) and of the frozen reference (without)."""
    backbone = policy.backbone
    err = masked_mse(backbone.denoise(x_t, t, cond, mask), target, mask)
    with backbone.reference() as ref:
        ref_err = masked_mse(ref.denoise(x_t, t, cond, mask), target, mask)
    return err, ref_err
