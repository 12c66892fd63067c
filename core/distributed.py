"""The processes of a multi-process run as the core sees them: who am I, and the few collectives it needs.

Lightning starts the processes and the process group (DDP, FSDP, DeepSpeed; `torchrun`, SLURM or its own
launcher). The core reads the group from `torch.distributed` and needs only this from it:

- `Ranks.rows(n)`: where this process's `n` rows sit in the global batch (every rank's rows, in rank
  order). Draws that belong to rows — rollout seeds, training noise and timesteps, condition dropout —
  are made for the whole global batch from the run's generator (identical on every rank) and each rank
  keeps its slice (`RowShard.take`). So a global batch gets the same seeds and noise at any number of
  processes (one process with batch B and two with B/2 each train on the same samples), no two ranks
  ever share noise, and the run generator stays in step on every rank because every rank draws the same
  amount.
- `Ranks.gather` / `gather_objects`: rewards, prompt keys and metrics of every rank, in rank order, for
  statistics over the global batch (per-prompt normalisation, group and batch advantages, evaluation).
- `Ranks.reduce_metrics`: one collective per training step that reduces every logged metric across ranks.

Every method is a collective when there is more than one process: all ranks must call it, in the same
order. With one process (or no process group) each is a cheap identity, so single-process runs draw and
compute exactly what they always did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: environment variables that give a process's global rank before the process group exists, in the
#: order Lightning reads them (torchrun / its own launcher's children / SLURM / LSF)
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launch_rank() -> int:
    """This process's global rank as its launcher announced it (0 when nothing says otherwise).

    Readable before the process group exists, e.g. while the CLI builds the trainer. Lightning's own
    launcher gives its children LOCAL_RANK and NODE_RANK; a child on another node with LOCAL_RANK 0 is
    still not rank 0.
    """
    for key in _RANK_ENV:
        value = os.environ.get(key)
        if value is not None:
            rank = int(value)
            if key == "LOCAL_RANK" and rank == 0 and int(os.environ.get("NODE_RANK", "0") or 0) > 0:
                return 1  # local rank 0 of a node other than the first
            return rank
    return 0


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class RowShard:
    """This rank's rows `[offset, offset + count)` of a global batch of `total` rows.

    `event` is the largest per-row shape over the ranks (set by `Ranks.rows(n, event)`), so draws of
    padded, variable-size samples agree in size on every rank.
    """

    offset: int
    count: int
    total: int
    event: tuple[int, ...] | None = None

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.count)

    def take(self, values: Any) -> Any:
        """This rank's rows of a per-row sequence or tensor of the global batch."""
        return values[self.rows]

    def draw(self, draw: Callable[[int], Tensor]) -> Tensor:
        """`draw(total)` (e.g. timesteps for every row of the global batch), this rank's rows of it."""
        return draw(self.total)[self.rows]

    def noise(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None,
        mask: Tensor | None = None,
        device: Any = None,
    ) -> Tensor:
        """Masked standard-normal noise of `shape` (this rank's rows) cut from one draw for the global
        batch at the largest event shape; with one rank exactly `masked_noise(shape, generator, mask)`."""
        from diffalign.core.functional import expand_mask, randn

        local = tuple(shape[1:])
        event = self.event if self.event is not None else local
        full = randn((self.total, *event), generator, device=device)[self.rows]
        if tuple(event) != local:
            full = full[(slice(None), *(slice(0, n) for n in local))]
        m = expand_mask(mask, full)
        return full if m is None else full * m


class Ranks:
    """The run's processes: this one's `rank` in `world_size`, and the collectives of the core.

    `Ranks.current()` reads the process group Lightning set up (one process when there is none).
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        self.rank, self.world_size = rank, world_size

    @classmethod
    def current(cls) -> Ranks:
        if not _group_active():
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    # -- collectives ---------------------------------------------------------------------------------
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_lists(self, items: Sequence[Any]) -> list[Any]:
        """Every rank's items, concatenated in rank order."""
        if not self.distributed:
            return list(items)
        return [x for part in self.gather_objects(list(items)) for x in part]

    def gather(self, values: Tensor) -> Tensor:
        """Every rank's rows of `values` (any first-dim length per rank), concatenated in rank order, on
        `values`' device."""
        if not self.distributed:
            return values
        parts = self.gather_objects(values.detach().cpu())
        return torch.cat(parts).to(values.device)

    def rows(self, count: int, event: Sequence[int] | None = None) -> RowShard:
        """Where this rank's `count` rows sit in the global batch (and the largest `event` shape)."""
        if not self.distributed:
            return RowShard(0, count, count, tuple(event) if event is not None else None)
        infos = self.gather_objects((count, tuple(event) if event is not None else None))
        counts = [c for c, _ in infos]
        shapes = [e for _, e in infos if e is not None]
        largest = None
        if shapes:
            if len({len(s) for s in shapes}) != 1:
                raise ValueError(f"ranks hold samples of different ranks of shape: {shapes}")
            largest = tuple(max(dims) for dims in zip(*shapes, strict=True))
        return RowShard(sum(counts[: self.rank]), count, sum(counts), largest)

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        return float(sum(self.gather_objects(float(value))))

    def flags(self, flag: bool) -> list[bool]:
        """Every rank's flag (a collective check before something only some ranks would do)."""
        return [bool(f) for f in self.gather_objects(bool(flag))]

    def reduce_metrics(
        self, metrics: dict[str, float], how: dict[str, str] | None = None
    ) -> dict[str, float]:
        """Each metric reduced over the ranks that report it: "mean" (default), "sum" or "max"
        ("first_max" counts as "max", "last" as "mean")."""
        if not self.distributed:
            return dict(metrics)
        how = how or {}
        values: dict[str, list[float]] = {}
        for part in self.gather_objects(dict(metrics)):
            for k, v in part.items():
                values.setdefault(k, []).append(float(v))
        out = {}
        for k, vs in values.items():
            rule = how.get(k, "mean")
            if rule == "sum":
                out[k] = sum(vs)
            elif rule in ("max", "first_max"):
                out[k] = max(vs)
            else:
                out[k] = sum(vs) / len(vs)
        return out


SINGLE = Ranks()


def is_sharded(trainer: Any) -> bool:
    """Whether a trainer's model holds FSDP units (sharded weights: forward passes, state dicts and
    gradient norms are then collectives)."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    if model is None or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def clip_sharded_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of sharded parameters (each rank holds disjoint shards of every
    gradient): the squared norms are summed over the ranks. Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    total = local.to(device)
    if _group_active():
        torch.distributed.all_reduce(total)
    norm = float(total.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.detach().mul_(scale)
    return norm


def is_fsdp_strategy(strategy: Any) -> bool:
    """Whether a Lightning strategy shards with torch's FSDP (Lightning's FSDPStrategy or a subclass)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def shard_contiguous(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of `n` items split as evenly as possible (the first `n % world`
    ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
