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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.functional import masked_mse, randn
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Cond


@dataclass
class NoisedPairBatch:
    """Both samples of each pair noised with the same t and noise."""

    x_t: Tensor  # (2B, *event): winners then losers
    t: Tensor  # (2B,)
    target: Tensor  # (2B, *event)
    cond: Cond  # 2B rows
    mask: Tensor | None
    label: Tensor  # (B,) preference strength of the winner


def _encode(backbone: Any, samples: Any, device: torch.device) -> tuple[Tensor, Tensor | None]:
    enc = backbone.encode(samples)
    x0, mask = enc if isinstance(enc, tuple) else (enc, None)
    return x0.to(device).float(), mask


def _pad_pair(x_w: Tensor, x_l: Tensor, m_w: Tensor, m_l: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero-pad two masked batches (B, N, ...) / masks (B, N) along N to the larger N."""
    n = max(x_w.shape[1], x_l.shape[1])

    def pad(x: Tensor) -> Tensor:
        if x.shape[1] == n:
            return x
        extra = torch.zeros((x.shape[0], n - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
        return torch.cat([x, extra], dim=1)

    return pad(x_w), pad(x_l), pad(m_w), pad(m_l)


def noised_pairs(
    policy: DiffusionPolicy,
    x0_w: Tensor,
    x0_l: Tensor,
    cond: Cond,
    generator: torch.Generator,
    mask: Tensor | None = None,
    label: Tensor | None = None,
    mask_l: Tensor | None = None,
) -> NoisedPairBatch:
    """Noise winners and losers with one shared (t, ε) per pair.

    `mask` is the winners' mask and `mask_l` the losers' (default: the winners'). Masked samples of
    different padded sizes (molecules with more atoms on one side) are zero-padded to one size, with
    the padding masked out.
    """
    kernel = policy.kernel
    b = x0_w.shape[0]
    if mask is not None:
        mask_l = mask if mask_l is None else mask_l
        x0_w, x0_l, mask, mask_l = _pad_pair(x0_w, x0_l, mask, mask_l)
    _, t, _ = kernel.training_sample(x0_w, generator)  # draws t of the right kind (int or sigma·N)
    noise = randn(x0_w.shape, generator, device=x0_w.device)
    x0 = torch.cat([x0_w, x0_l])
    noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    x_t = kernel.add_noise(x0, noise2, t2)
    target = kernel.target(x0, noise2, t2)
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
    mask2 = torch.cat([mask, mask_l]) if mask is not None else None
    lab = torch.ones(b, device=x0_w.device) if label is None else label.to(x0_w.device).float()
    return NoisedPairBatch(x_t, t2, target, cond2, mask2, lab)


def denoising_errors(
    policy: DiffusionPolicy, x_t: Tensor, t: Tensor, cond: Cond, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-sample denoising errors of the policy (with grad) and of the frozen reference (without)."""
    backbone = policy.backbone
    err = masked_mse(backbone.denoise(x_t, t, cond, mask), target, mask)
    with backbone.reference() as ref:
        ref_err = masked_mse(ref.denoise(x_t, t, cond, mask), target, mask)
    return err, ref_err


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

    def prepare(
        self, ctx: AlignContext, batch: Mapping[str, Any]
    ) -> tuple[NoisedPairBatch, dict[str, float]]:
        for key in ("winner", "loser"):
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__} needs '{key}' samples in the batch; it has {sorted(batch)}"
                )
        backbone = ctx.policy.backbone
        x0_w, mask = _encode(backbone, batch["winner"], ctx.device)
        x0_l, mask_l = _encode(backbone, batch["loser"], ctx.device)
        cond = backbone.encode_condition(batch)
        label = torch.as_tensor(batch["label"], dtype=torch.float32) if "label" in batch else None
        pairs = noised_pairs(ctx.policy, x0_w, x0_l, cond, ctx.generator, mask, label, mask_l=mask_l)
        return pairs, {}

    def forward(self, policy: DiffusionPolicy, micro: NoisedPairBatch) -> dict[str, Tensor]:
        err, ref_err = denoising_errors(policy, micro.x_t, micro.t, micro.cond, micro.target, micro.mask)
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
