"""Diffusion-DPO: direct preference optimisation on the denoising loss.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", arXiv:2311.12908.
For a pair (c, x0ʷ, x0ˡ), draw ONE timestep t and ONE noise ε for both samples, noise them, and compare
each model's denoising error with the frozen reference's:

    inside = −½·β·[(‖fʷ_θ − targetʷ‖² − ‖fʷ_ref − targetʷ‖²) − (‖fˡ_θ − targetˡ‖² − ‖fˡ_ref − targetˡ‖²)]
    loss   = −log σ(inside)        (for a label y ∈ [0, 1]: −[y log σ(inside) + (1−y) log σ(−inside)])

with squared errors averaged over event dims, as the reference code does. At initialisation θ = ref, so
inside = 0 and the loss is log 2. Targets follow the prediction type (ε, v, x0, or ε − x0 for flow
matching, i.e. Flow-DPO). Logs `implicit_acc` = mean(inside > 0), `inside_mean`, and the four errors.

The batch holds the two samples in the modality's layout under `winner` and `loser` (the backbone's
`encode` maps them to model space), the conditioning keys, and optionally `label` (1 = the winner is
preferred, 0.5 = tie).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.denoising import denoising_errors
from diffalign.core.distributed import RowShard
from diffalign.core.functional import expand_mask, pad_along
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext
from diffalign.core.types import Batch, Cond


def pad_pair(
    x_w: Tensor, x_l: Tensor, m_w: Tensor, m_l: Tensor, axis: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero-pad two masked batches (and their masks) along event axis `axis` to the longer one."""
    dim = 1 + axis
    n = max(x_w.shape[dim], x_l.shape[dim])
    return (
        pad_along(x_w, n, dim),
        pad_along(x_l, n, dim),
        pad_along(m_w, n, dim) if m_w.dim() > dim else m_w,
        pad_along(m_l, n, dim) if m_l.dim() > dim else m_l,
    )


def noised_pairs(
    policy: DiffusionPolicy,
    x0_w: Tensor,
    x0_l: Tensor,
    cond: Cond,
    generator: torch.Generator,
    mask_w: Tensor | None = None,
    mask_l: Tensor | None = None,
    label: Tensor | None = None,
    rows: RowShard | None = None,
) -> Batch:
    """Noise winners and losers with one shared (t, ε) per pair.

    Masked samples of different sizes (a molecule with more atoms on one side, clips of different
    lengths) are zero-padded along the backbone's `variable_axis` to one size, with the padding masked
    out; the shared noise is drawn under the union of both masks and each side keeps only its own.
    With `rows` (this rank's pairs of the global batch), (t, ε) are drawn for the global batch and this
    rank keeps its pairs' (the same draws at any number of processes).
    Returns `Batch(x_t_w, x_t_l, t, target_w, target_l, cond, mask_w, mask_l, label)`.
    """
    kernel = policy.kernel
    b = x0_w.shape[0]
    cond = Cond.of(cond, b)
    if (mask_w is None) != (mask_l is None):
        raise ValueError("winner and loser must both have masks or neither")
    if mask_w is not None:
        axis = getattr(policy.backbone, "variable_axis", None)
        if x0_w.shape != x0_l.shape:
            if axis is None:
                raise ValueError(
                    f"winner {tuple(x0_w.shape)} and loser {tuple(x0_l.shape)} differ in shape but "
                    f"{type(policy.backbone).__name__} declares no variable_axis to pad along"
                )
            x0_w, x0_l, mask_w, mask_l = pad_pair(x0_w, x0_l, mask_w, mask_l, axis)
    rows = rows if rows is not None else RowShard(0, b, b)
    t = rows.draw(lambda n: kernel.draw_timesteps(n, generator, x0_w.device))
    union = None if mask_w is None else torch.maximum(mask_w.float(), mask_l.float())
    noise = rows.noise(x0_w.shape, generator, union, device=x0_w.device)
    noise_w = noise if mask_w is None else noise * expand_mask(mask_w, noise)
    noise_l = noise if mask_l is None else noise * expand_mask(mask_l, noise)
    lab = torch.ones(b, device=x0_w.device) if label is None else label.to(x0_w.device).float()
    return Batch(
        x_t_w=kernel.add_noise(x0_w, noise_w, t),
        x_t_l=kernel.add_noise(x0_l, noise_l, t),
        t=t,
        target_w=kernel.target(x0_w, noise_w, t),
        target_l=kernel.target(x0_l, noise_l, t),
        cond=cond,
        mask_w=mask_w,
        mask_l=mask_l,
        label=lab,
    )


def preference_loss(inside: Tensor, label: Tensor) -> Tensor:
    """−[y log σ(inside) + (1−y) log σ(−inside)] per pair."""
    return -(label * F.logsigmoid(inside) + (1 - label) * F.logsigmoid(-inside))


class DiffusionDPO(Algorithm):
    """Offline DPO on preference pairs.

    Args:
        beta: β (5000 for SD/SDXL in the paper, 2000 in Tango 2; small models need far less).
        sft_weight: optional weight of the plain denoising loss on the winners (a regulariser).
    """

    needs_reference = True
    needs_reward = False

    def __init__(self, beta: float = 5000.0, sft_weight: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.sft_weight = beta, sft_weight

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        for key in ("winner", "loser"):
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__} needs '{key}' samples in the batch; it has {sorted(batch)}"
                )
        backbone = ctx.policy.backbone
        x0_w, mask_w = backbone.encode(batch["winner"])
        x0_l, mask_l = backbone.encode(batch["loser"])
        cond = backbone.condition(batch)
        label = torch.as_tensor(batch["label"], dtype=torch.float32) if "label" in batch else None
        x0_w, x0_l = x0_w.to(ctx.device).float(), x0_l.to(ctx.device).float()
        # ragged pairs are padded to the longer side first: the event shape here is an upper bound
        event = [max(a, b) for a, b in zip(x0_w.shape[1:], x0_l.shape[1:], strict=True)]
        rows = ctx.rows(len(x0_w), event)
        pairs = noised_pairs(ctx.policy, x0_w, x0_l, cond, ctx.generator, mask_w, mask_l, label, rows)
        return pairs, {}

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        # winners and losers go through the network as one batch (their rows are independent)
        x_t = torch.cat([micro.x_t_w, micro.x_t_l])
        target = torch.cat([micro.target_w, micro.target_l])
        mask = None if micro.mask_w is None else torch.cat([micro.mask_w, micro.mask_l])
        t, cond = torch.cat([micro.t, micro.t]), Cond.cat([micro.cond, micro.cond])
        err, ref_err = denoising_errors(policy, x_t, t, cond, target, mask)
        err_w, err_l = err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        inside = -0.5 * self.beta * ((err_w - ref_w) - (err_l - ref_l))
        loss = preference_loss(inside, micro.label).mean()
        if self.sft_weight > 0:
            loss = loss + self.sft_weight * err_w.mean()
        return {
            "loss": loss,
            "implicit_acc": (inside.detach() > 0).float().mean(),
            "inside_mean": inside.detach().mean(),
            "mse_winner": err_w.detach().mean(),
            "mse_loser": err_l.detach().mean(),
            "ref_mse_winner": ref_w.mean(),
            "ref_mse_loser": ref_l.mean(),
        }
