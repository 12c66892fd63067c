"""Batched containers that flow from sampling to the loss.

Everything is batch-first so that indexing, moving and concatenating act on every field at once.
A `Trajectory` holds one sampling run per row; a `PreferencePair` holds a winner and a loser sample
for the same condition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

Cond = dict[str, Tensor]
Index = int | slice | Tensor | Sequence[int]
T = TypeVar("T", bound="_Batched")


def _map(value: Any, fn) -> Any:
    """Apply `fn` to every tensor inside `value` (tensors, dicts, lists, tuples, None)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _as_index(index: Index, size: int) -> slice | Tensor:
    if (
        isinstance(index, Tensor)
        and index.dim() == 0
        and not index.is_floating_point()
        and index.dtype != torch.bool
    ):
        index = int(index)  # a 0-dim index (e.g. argmax) selects one row like an int
    if isinstance(index, int):
        if not -size <= index < size:  # out of range must raise (also ends `for row in batch`)
            raise IndexError(f"index {index} is out of range for a batch of {size}")
        return slice(index, index + 1) if index != -1 else slice(-1, None)
    if isinstance(index, slice):
        return index
    if isinstance(index, Tensor):
        return index
    idx = torch.as_tensor(list(index))
    return idx if idx.dtype == torch.bool else idx.long()  # a list of bools is a mask, not indices 0/1


def _index(value: Any, idx: slice | Tensor) -> Any:
    if isinstance(value, Tensor):
        return value[idx.to(value.device) if isinstance(idx, Tensor) else idx]
    if isinstance(value, Mapping):
        return {k: _index(v, idx) for k, v in value.items()}
    if isinstance(value, list):
        if isinstance(idx, slice):
            return value[idx]
        ids = idx.nonzero().flatten().tolist() if idx.dtype == torch.bool else idx.tolist()
        return [value[i] for i in ids]
    return value


def _cat(values: list[Any]) -> Any:
    first = values[0]
    if first is None:
        if any(v is not None for v in values):
            raise ValueError("cannot concatenate batches where a field is set in some and None in others")
        return None
    if isinstance(first, Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, Mapping):
        keys = set(first)
        for v in values[1:]:
            if set(v) != keys:
                raise ValueError(
                    f"cannot concatenate dicts with different keys: {sorted(keys)} vs {sorted(v)}"
                )
        return {k: _cat([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [item for v in values for item in v]
    return first


class _Batched:
    """Shared batch operations for the dataclasses below (every field is batch-first)."""

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to(self: T, *args: Any, **kwargs: Any) -> T:
        """Move every tensor, like `Tensor.to` (device and/or dtype for floating tensors only)."""

        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            # integer/bool tensors keep their dtype; only the device moves
            device = kwargs.get("device") or next(
                (a for a in args if isinstance(a, (str, torch.device))), None
            )
            return t.to(device) if device is not None else t

        return type(self)(**{k: _map(v, move) for k, v in self._fields().items()})

    def detach(self: T) -> T:
        """A copy whose tensors are cut from the autograd graph."""
        return type(self)(**{k: _map(v, lambda t: t.detach()) for k, v in self._fields().items()})

    def __getitem__(self: T, index: Index) -> T:
        idx = _as_index(index, len(self))  # type: ignore[arg-type]
        return type(self)(**{k: _index(v, idx) for k, v in self._fields().items()})

    @classmethod
    def cat(cls: type[T], items: Sequence[T]) -> T:
        """Concatenate along the batch dimension."""
        if not items:
            raise ValueError(f"{cls.__name__}.cat needs at least one item")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        return cls(**{n: _cat([getattr(it, n) for it in items]) for n in names})


@dataclass
class Trajectory(_Batched):
    """One sampling run per row, stored so that each transition can be re-scored later.

    Attributes:
        states: (B, T+1, *event) x_T … x_0 in model space.
        timesteps: (B, T) the scheduler timestep of each transition.
        log_probs: (B, T) log-prob of each transition under the policy that sampled it.
        cond: conditioning, a dict of batched tensors.
        mask: optional (B, *event)-broadcastable 0/1 tensor marking real entries of padded samples.
        rewards: optional (B,) reward of the final sample.
        advantages: optional (B,) or (B, T) advantages.
        extras: anything else batch-first (e.g. prompts, group ids).
    """

    states: Tensor
    timesteps: Tensor
    log_probs: Tensor
    cond: Cond = field(default_factory=dict)
    mask: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.states.dim() < 3:
            raise ValueError(f"states must be (B, T+1, *event), got shape {tuple(self.states.shape)}")
        b, t1 = self.states.shape[:2]
        if self.timesteps.shape != (b, t1 - 1) or self.log_probs.shape != (b, t1 - 1):
            raise ValueError(
                f"timesteps {tuple(self.timesteps.shape)} and log_probs {tuple(self.log_probs.shape)} "
                f"must be (B, T) = ({b}, {t1 - 1}) for states {tuple(self.states.shape)}"
            )

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1

    @property
    def event_shape(self) -> torch.Size:
        return self.states.shape[2:]

    @property
    def x0(self) -> Tensor:
        """The final samples, (B, *event)."""
        return self.states[:, -1]


@dataclass
class PreferencePair(_Batched):
    """A batch of (condition, preferred sample, dispreferred sample) in model space.

    Attributes:
        cond: conditioning shared by both samples.
        winner, loser: (B, *event) samples.
        margin: optional (B,) strength of the preference (1 = plain pair; 0.5 can mean a tie).
        mask_winner, mask_loser: optional masks for padded samples.
        step_labels: optional (B, T) per-step preference labels (+1 / -1 / 0) for step-aware methods.
    """

    cond: Cond
    winner: Tensor
    loser: Tensor
    margin: Tensor | None = None
    mask_winner: Tensor | None = None
    mask_loser: Tensor | None = None
    step_labels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.winner.shape != self.loser.shape:
            raise ValueError(
                f"winner {tuple(self.winner.shape)} and loser {tuple(self.loser.shape)} must have one shape"
            )

    def __len__(self) -> int:
        return self.winner.shape[0]

    @property
    def batch_size(self) -> int:
        return self.winner.shape[0]
