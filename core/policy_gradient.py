"""Pieces of the policy-gradient family (DDPO, DPOK, GRPO) that each method file composes.

- `step_minibatches`: shuffle samples and, per sample, the denoising steps; train the first
  `timestep_fraction` of them; group micro-batches into optimiser steps (ddpo-pytorch's loop).
- `clipped_surrogate`: the clipped importance-ratio objective and its diagnostics.
- `reference_kl`: the closed-form per-step KL of the policy's transition to the frozen reference's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from diffalign.core.functional import gaussian_kl_same_std, reduce_event
from diffalign.core.kernels import StepOutput
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Batch, Trajectory


def step_minibatches(
    data: Trajectory,
    generator: torch.Generator,
    timestep_fraction: float = 1.0,
    num_inner_epochs: int = 1,
    train_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
) -> Iterator[list[Batch]]:
    """Yield one list of micro-batches `Batch(traj=rows, step=(rows,) step index)` per optimiser step.

    Per inner epoch: a random order of samples and, per sample, a random order of its T steps of which
    the first ⌊T·timestep_fraction⌋ are trained; an optimiser step covers
    `train_batch_size × gradient_accumulation_steps` samples, each on all its trained steps.
    """
    b, t = data.batch_size, data.num_steps
    n_steps = max(1, int(t * timestep_fraction))
    bs = train_batch_size or b
    per_update = bs * gradient_accumulation_steps
    device = data.states.device
    for _ in range(num_inner_epochs):
        perm = torch.randperm(b, generator=generator).to(device)
        step_perm = torch.stack([torch.randperm(t, generator=generator) for _ in range(b)]).to(device)
        for start in range(0, b, per_update):
            micro = []
            for s in range(start, min(start + per_update, b), bs):
                rows = perm[s : s + bs]
                sub = data[rows]
                micro.extend(Batch(traj=sub, step=step_perm[rows, j]) for j in range(n_steps))
            yield micro


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> dict[str, Tensor]:
    """mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(log p − log p_old), and its diagnostics; at ratio
    1 the loss is −mean(advantages).

    Diagnostics: `approx_kl` = ½·E[(log p − log p_old)²], `clipfrac`, `ratio_mean`, `ratio_max_dev`
    (max |ρ − 1|) and `first_update_ratio_dev` (the same value, which the module reduces over the first
    optimiser step of a batch only: it must be ~0, see `RatioConsistencyCheck`).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        dev = (ratio.detach() - 1.0).abs().max()
        return {
            "loss": loss,
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.detach().mean(),
            "ratio_max_dev": dev,
            "first_update_ratio_dev": dev,
        }


#: how the module aggregates the diagnostics of `clipped_surrogate` over the micro-batches of a batch
SURROGATE_REDUCTION = {"ratio_max_dev": "max", "first_update_ratio_dev": "first_max"}


def reference_kl(policy: DiffusionPolicy, micro: Batch, new: StepOutput) -> Tensor:
    """Per-sample KL(π_θ ‖ π_ref) of the re-scored transitions: ‖μ_θ − μ_ref‖²/(2σ²) for two Gaussian
    steps of equal std σ, reduced over event dims like the log-probs (Flow-GRPO's closed form)."""
    with policy.backbone.reference() as ref:
        ref_mean = policy.log_prob(micro.traj, micro.step, backbone=ref).mean
    return gaussian_kl_same_std(
        new.mean, ref_mean, new.std.detach(), micro.traj.mask, policy.kernel.reduction
    )


def guarded_log_ratio(
    new: StepOutput, old_log_prob: Tensor, old_mean: Tensor, mask: Tensor | None, reduction: str
) -> Tensor:
    """GRPO-Guard's normalised log-ratio (arXiv 2510.22319; Flow-Factory's `grpo-guard`).

    For a Gaussian step of std s, with Δ = μ_θ − μ_old and the stored x' = μ_old + s·z, the plain log-ratio
    is log ρ = reduce(z·Δ/s − Δ²/(2s²)): its mean −reduce(Δ²)/(2s²) is negative (the SDE's biased ratio,
    formulas.md §11.3) and its spread grows as 1/s, so low-noise steps dominate the clipped objective.
    RatioNorm and the per-step reweighting together give

        log ρ̃ = s·log ρ + reduce(Δ²)/(2s) = reduce(z·Δ),

    unbiased (zero mean under the behaviour policy) and with each step's gradient no longer scaled by 1/s.
    Steps with s = 0 (deterministic) get log ρ̃ = 0. `reduce` is the kernel's event reduction.
    """
    b = old_log_prob.shape[0]
    s = new.std.reshape(b, -1).amax(dim=1)
    delta2 = reduce_event((new.mean - old_mean.to(new.mean)) ** 2, mask, reduction)
    safe = s.clamp_min(1e-12)
    out = safe * (new.log_prob - old_log_prob) + delta2 / (2 * safe)
    return torch.where(s > 0, out, torch.zeros_like(out))


class SDEWindow:
    """Which contiguous window of denoising steps is stochastic in a batch (MixGRPO arXiv 2507.21802 and
    Flow-GRPO-Fast): the rollout takes ODE steps elsewhere and only the window's steps are stored and
    trained.

    Args:
        size: steps in the window.
        schedule: "progressive" (MixGRPO's default: the window starts at step 0 and moves later by
            `stride` every `shift_every` batches, then stays at the end — or starts over with `roll_back`)
            or "random" (a uniformly random start each batch, as Flow-GRPO-Fast).
        shift_every: batches per window position (MixGRPO's `iters_per_group`, 25).
        stride: steps the window moves (default: `size`, non-overlapping; MixGRPO's `prog_overlap_step`).
        roll_back: start again at step 0 after the last position.

    The window ranges over all T steps; its state (batches seen) is plain data for checkpoints.
    """

    def __init__(
        self,
        size: int,
        schedule: str = "progressive",
        shift_every: int = 25,
        stride: int | None = None,
        roll_back: bool = False,
    ) -> None:
        if size < 1 or shift_every < 1 or (stride is not None and stride < 1):
            raise ValueError("SDE window: need size >= 1, shift_every >= 1 and stride >= 1")
        if schedule not in ("progressive", "random"):
            raise ValueError(f"SDE window schedule must be 'progressive' or 'random', got {schedule!r}")
        self.size, self.schedule, self.shift_every = size, schedule, shift_every
        self.stride, self.roll_back = stride or size, roll_back
        self.batches = 0

    def window(self, num_steps: int, generator: torch.Generator) -> tuple[int, int]:
        """(start, stop) of this batch's stochastic steps; call `advance` after the batch."""
        size = min(self.size, num_steps)
        last = num_steps - size  # the largest start
        if self.schedule == "random":
            start = int(torch.randint(0, last + 1, (1,), generator=generator))
        else:
            k = self.batches // self.shift_every
            start = (
                (k % (last // self.stride + 1)) * self.stride
                if self.roll_back
                else min(k * self.stride, last)
            )
        return start, start + size

    def advance(self) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state.get("batches", 0))
