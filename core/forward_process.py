"""Training on the forward (noising) process of the model's own samples: the shared pieces of the
decoupled RL methods (DiffusionNFT, AWM), which need no log-probs of the sampler.

A rollout keeps only each sample's final x0, its condition and reward. Training points are drawn on
the forward process: per sample, J timesteps (the sampling schedule's, shuffled, or uniform) and fresh
noise, x_t = add_noise(x0, ε, t) and the kernel's target (ε, v, x0 or ε − x0). A reference output
under fixed weights (the "old" policy of DiffusionNFT, the behaviour policy of AWM) is computed once per
point when the batch is prepared, so the loss compares the live model with it exactly.

- `forward_points`: the (B, J) points of a batch, with the reference outputs.
- `point_minibatches`: one list of micro-batches (rows × one point each) per optimiser step.
- `SoftCopy`: a soft-updated copy of the trainable weights, swapped in to evaluate the old policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.distributed import RowShard
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Batch, Cond

TimestepStrategy = Literal["schedule", "uniform"]
#: the (B, J, ...) fields of a batch of forward-process points
POINT_FIELDS = ("t", "x_t", "target", "reference", "reference_log_prob")


def training_timesteps(
    policy: DiffusionPolicy,
    batch: int,
    count: int,
    strategy: TimestepStrategy,
    generator: torch.Generator,
    rows: RowShard | None = None,
) -> Tensor:
    """(batch, count) training timesteps: per row, `count` of the sampling schedule's T timesteps in a
    random order ("schedule", DiffusionNFT's choice) or `count` uniform draws over the whole schedule
    ("uniform", `kernel.draw_timesteps`).

    With `rows` (this rank's rows of the global batch, `AlignContext.rows`) the timesteps are drawn for
    the whole global batch from the run generator and this rank keeps its rows', so 2 ranks × B/2 train
    at the points 1 rank × B does."""
    if rows is not None:
        if rows.count != batch:
            raise ValueError(f"rows hold {rows.count} rows of this rank, the batch {batch}")
        return rows.draw(lambda total: training_timesteps(policy, total, count, strategy, generator))
    kernel = policy.kernel
    if strategy == "schedule":
        ts = kernel.set_timesteps(policy.num_steps).cpu()
        if count > len(ts):
            raise ValueError(f"cannot train on {count} of the schedule's {len(ts)} timesteps")
        order = torch.stack([torch.randperm(len(ts), generator=generator)[:count] for _ in range(batch)])
        return ts[order]
    if strategy == "uniform":
        return torch.stack([kernel.draw_timesteps(batch, generator) for _ in range(count)], dim=1).cpu()
    raise ValueError(f"timestep strategy must be 'schedule' or 'uniform', got {strategy!r}")


@torch.no_grad()
def forward_points(
    policy: DiffusionPolicy,
    x0: Tensor,
    cond: Cond,
    mask: Tensor | None,
    t: Tensor,
    generator: torch.Generator,
    reference: Callable[[Tensor, Tensor], Tensor] | None = None,
    rows: RowShard | None = None,
) -> Batch:
    """The forward-process points of `x0` (B, *event) at timesteps `t` (B, J).

    Returns a `Batch` with `x0`, `cond`, `mask`, `t` (B, J), `x_t` and `target` (B, J, *event), and — when
    `reference(x_t, t)` (the output of fixed weights, no grad) is given — `reference` (B, J, *event).
    Noise is masked: padded entries get none. With `rows` (this rank's rows of the global batch) the
    noise of each point is cut from one draw for the global batch (`RowShard.noise`), as the timesteps.
    """
    kernel = policy.kernel
    b, j = t.shape
    t = t.to(x0.device)
    rows = rows if rows is not None else RowShard(0, b, b)
    xs, targets, refs = [], [], []
    for k in range(j):
        noise = rows.noise(x0.shape, generator, mask, device=x0.device)
        x_t = kernel.add_noise(x0, noise, t[:, k])
        xs.append(x_t)
        targets.append(kernel.target(x0, noise, t[:, k]))
        if reference is not None:
            refs.append(reference(x_t, t[:, k]).float())
    out = Batch(
        x0=x0.float(),
        cond=cond,
        mask=mask,
        t=t,
        x_t=torch.stack(xs, 1),
        target=torch.stack(targets, 1),
    )
    return out.replace(reference=torch.stack(refs, 1)) if reference is not None else out


def point_minibatches(
    data: Batch,
    generator: torch.Generator,
    num_inner_epochs: int = 1,
    train_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
) -> Iterator[list[Batch]]:
    """One list of micro-batches per optimiser step, as `policy_gradient.step_minibatches` does for
    trajectories: per inner epoch the samples in a random order, `train_batch_size` samples a micro-batch,
    each micro-batch at one of the J points (`point` is the index); an optimiser step covers
    `train_batch_size × gradient_accumulation_steps` samples at all J points.

    The per-point fields (`POINT_FIELDS`: t, x_t, target, reference, reference_log_prob) become
    (rows, ...) at that point; the other fields are indexed by rows.
    """
    b, j = data.t.shape
    bs = train_batch_size or b
    per_update = bs * gradient_accumulation_steps
    per_point = [k for k in POINT_FIELDS if k in data]
    for _ in range(num_inner_epochs):
        perm = torch.randperm(b, generator=generator)
        for start in range(0, b, per_update):
            micro = []
            for s in range(start, min(start + per_update, b), bs):
                rows = perm[s : s + bs]
                sub = data[rows]
                for k in range(j):
                    micro.append(sub.replace(**{name: sub[name][:, k] for name in per_point}, point=k))
            yield micro


class SoftCopy:
    """A copy of a module's trainable weights, soft-updated as old ← decay·old + (1 − decay)·θ, and swapped
    into the live parameters to evaluate the copy (DiffusionNFT's "old" policy).

    With LoRA only the adapters train, so this is a copy of the adapter weights (the frozen base is shared);
    with full fine-tuning it copies every trainable tensor. Swapping replaces each parameter's storage
    (no copy); use it only under `torch.no_grad()`. Its tensors are plain data for checkpoints.
    """

    def __init__(self) -> None:
        self.values: list[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.values)

    @torch.no_grad()
    def update(self, params: Sequence[nn.Parameter], decay: float) -> None:
        """old ← decay·old + (1 − decay)·θ (the first call copies θ)."""
        if not self.values:
            self.values = [p.detach().clone() for p in params]
            return
        if len(self.values) != len(params):
            raise RuntimeError(f"SoftCopy holds {len(self.values)} tensors but the model has {len(params)}")
        for v, p in zip(self.values, params, strict=True):
            if v.device != p.device:
                v.data = v.data.to(p.device)
            v.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    @contextmanager
    def swapped_in(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        """The copy's values in the live parameters for the duration of the block."""
        saved = [p.data for p in params]
        for v, p in zip(self.values, params, strict=True):
            if v.device != p.device:  # e.g. restored from a checkpoint on the CPU
                v.data = v.data.to(p.device)
        try:
            for p, v in zip(params, self.values, strict=True):
                p.data = v
            yield
        finally:
            for p, s in zip(params, saved, strict=True):
                p.data = s

    def state_dict(self) -> dict[str, Any]:
        return {"values": [v.detach().cpu() for v in self.values]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [v.clone() for v in state.get("values", [])]
