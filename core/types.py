"""Batched containers that flow from sampling to the loss.

Everything is batch-first so that indexing, moving and concatenating act on every field at once:

- `Cond`: the conditioning of a batch — batched tensors (what the denoiser reads) and per-sample
  metadata (prompt strings or dicts, target values, ids: what rewards read) under one batch size;
- `Trajectory`: one sampling run per row, stored so that every transition can be re-scored;
- `PreferencePair`: a winner and a loser sample for the same condition;
- `Batch`: the one container algorithms use for their prepared data and micro-batches (named,
  row-aligned fields plus pass-through values such as a generator).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

Index = int | slice | Tensor | Sequence[int]
T = TypeVar("T", bound="_Batched")


# ---------------------------------------------------------------------------------------------------
# Row operations on any batch-first value (tensors, lists, Cond, batches, dicts of those)
# ---------------------------------------------------------------------------------------------------
def _map(value: Any, fn) -> Any:
    """Apply `fn` to every tensor inside `value` (tensors, dicts, lists, tuples, batches, None)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (Cond, Batch)):
        return type(value)._from_entries({k: _map(v, fn) for k, v in value._entries.items()}, len(value))
    if isinstance(value, _Batched):
        return type(value)(**{k: _map(v, fn) for k, v in value._fields().items()})
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
        if value.dim() == 0:
            return value
        return value[idx.to(value.device) if isinstance(idx, Tensor) else idx]
    if isinstance(value, (Cond, Batch, _Batched)):
        return value._rows(idx)
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
        if first.dim() == 0:
            return first
        return torch.cat(values, dim=0)
    if isinstance(first, (Cond, Batch, _Batched)):
        return type(first).cat(values)
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


def _rows_of(value: Any) -> int | None:
    """The number of rows of a batch-first value, or None for a value that is not row-aligned."""
    if isinstance(value, Tensor):
        return value.shape[0] if value.dim() > 0 else None
    if isinstance(value, (Cond, Batch, _Batched)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def _move(t: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """`Tensor.to` for floating tensors; integer/bool tensors keep their dtype and only move device."""
    if t.is_floating_point():
        return t.to(*args, **kwargs)
    device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
    return t.to(device) if device is not None else t


# ---------------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------------
class _RowContainer(Mapping[str, Any]):
    """A mapping of named batch-first entries with one batch size (shared by `Cond` and `Batch`).

    `container["key"]` is an entry; `container[rows]` (an int, slice, index or bool tensor, list of ints)
    selects rows of every entry. Lists hold per-row metadata; tensors are batch-first.
    """

    _check_rows = True

    def __init__(self, entries: Mapping[str, Any] | None = None, batch_size: int | None = None, **kw: Any):
        data = dict(entries or {})
        data.update(kw)
        for k, v in data.items():
            if isinstance(v, tuple):
                data[k] = list(v)
            elif isinstance(v, Mapping) and not isinstance(v, _RowContainer) and type(self) is Cond:
                data[k] = Cond(v)
        sizes = {k: n for k, v in data.items() if (n := _rows_of(v)) is not None}
        if batch_size is None:
            if not sizes:
                raise ValueError(
                    f"{type(self).__name__} with no batch-first entry needs an explicit batch_size"
                )
            batch_size = next(iter(sizes.values()))
        bad = {k: n for k, n in sizes.items() if n != batch_size}
        if bad and self._check_rows:
            raise ValueError(
                f"{type(self).__name__}: every entry must have {batch_size} rows; "
                + ", ".join(f"'{k}' has {n}" for k, n in bad.items())
            )
        self._entries = data
        self._batch_size = int(batch_size)

    @classmethod
    def _from_entries(cls, entries: dict[str, Any], batch_size: int):
        out = cls.__new__(cls)
        out._entries, out._batch_size = entries, batch_size
        return out

    # -- mapping ------------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._entries[key]
        return self._rows(_as_index(key, self._batch_size))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        """The number of rows (the batch size), like a tensor's len; `len(list(c))` counts entries."""
        return self._batch_size

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self):  # noqa: D102 - Mapping's, over the entries
        return self._entries.keys()

    def items(self):  # noqa: D102
        return self._entries.items()

    def values(self):  # noqa: D102
        return self._entries.values()

    def __eq__(self, other: object) -> bool:
        """Same entries with equal values (tensors compared with `torch.equal`)."""
        if not isinstance(other, Mapping) or set(self.keys()) != set(other.keys()):
            return False
        for k, v in self._entries.items():
            o = other[k]
            if isinstance(v, Tensor) or isinstance(o, Tensor):
                if not (isinstance(v, Tensor) and isinstance(o, Tensor) and torch.equal(v, o)):
                    return False
            elif v != o:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        def describe(v: Any) -> str:
            if isinstance(v, Tensor):
                return f"Tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            if isinstance(v, list):
                head = ", ".join(repr(x) for x in v[:2])
                return f"[{head}{', …' if len(v) > 2 else ''}]"
            return repr(v)

        inner = ", ".join(f"{k}={describe(v)}" for k, v in self._entries.items())
        return f"{type(self).__name__}(batch_size={self._batch_size}, {inner})"

    # -- batch operations ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    def _rows(self, idx: slice | Tensor):
        entries = {k: _index(v, idx) for k, v in self._entries.items()}
        if isinstance(idx, slice):
            n = len(range(*idx.indices(self._batch_size)))
        elif idx.dtype == torch.bool:
            n = int(idx.sum())
        else:
            n = int(idx.numel())
        return type(self)._from_entries(entries, n)

    def index(self, rows: Index):
        """The rows `rows` of every entry (same as `container[rows]` for a non-string index)."""
        return self._rows(_as_index(rows, self._batch_size))

    @classmethod
    def cat(cls, items: Sequence[Any]):
        """Concatenate along the batch dimension (every item must have the same entries)."""
        items = [cls.of(it) if not isinstance(it, cls) else it for it in items]
        if not items:
            raise ValueError(f"{cls.__name__}.cat needs at least one item")
        keys = list(items[0]._entries)
        for it in items[1:]:
            if set(it._entries) != set(keys):
                raise ValueError(
                    f"cannot concatenate {cls.__name__}s with different keys: "
                    f"{sorted(keys)} vs {sorted(it._entries)}"
                )
        entries = {k: _cat([it._entries[k] for it in items]) for k in keys}
        return cls._from_entries(entries, sum(len(it) for it in items))

    def to(self, *args: Any, **kwargs: Any):
        """Move every tensor, like `Tensor.to` (the dtype changes only floating tensors)."""
        return _map(self, lambda t: _move(t, args, kwargs))

    def detach(self):
        """A copy whose tensors are cut from the autograd graph."""
        return _map(self, lambda t: t.detach())

    def repeat_interleave(self, n: int):
        """Every row repeated n times in place (row i → rows i·n … i·n+n−1)."""
        if n == 1:
            return self
        idx = torch.arange(self._batch_size).repeat_interleave(n)
        return self._rows(idx)

    def replace(self, **entries: Any):
        """A copy with `entries` added or replaced (each with this batch size)."""
        out = dict(self._entries)
        out.update(entries)
        return type(self)(out, batch_size=self._batch_size)

    def drop(self, *keys: str):
        """A copy without `keys` (missing keys are ignored)."""
        return type(self)._from_entries(
            {k: v for k, v in self._entries.items() if k not in keys}, self._batch_size
        )

    @classmethod
    def of(cls, value: Any, batch_size: int | None = None):
        """`value` as this container (a plain dict is wrapped; an instance is returned as is)."""
        if isinstance(value, cls):
            return value
        if value is None:
            if batch_size is None:
                raise ValueError(f"{cls.__name__}.of(None) needs a batch_size")
            return cls({}, batch_size=batch_size)
        return cls(value, batch_size=batch_size)


class Cond(_RowContainer):
    """Batched conditioning: tensors (batch-first, what the denoiser reads) and per-sample metadata
    (lists of length B: prompt strings or dicts, target values, ids — what rewards read).

    `backbone.condition(batch)` builds it: the backbone's own tensors plus the batch's conditions under
    "prompt". It indexes (`cond[rows]`), concatenates (`Cond.cat`), repeats (`repeat_interleave`), moves
    (`to`) and edits (`replace`, `drop`, `where`) every entry together, so metadata travels with the
    tensors through guidance, resampling and re-scoring. `cond["key"]` reads an entry; `len(cond)` is
    the batch size.
    """

    @classmethod
    def empty(cls, batch_size: int) -> Cond:
        """A condition with no entries (unconditional samples, scoring without prompts)."""
        return cls({}, batch_size=batch_size)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The tensor entries."""
        return {k: v for k, v in self._entries.items() if isinstance(v, Tensor)}

    @property
    def metadata(self) -> dict[str, list[Any]]:
        """The per-sample metadata entries (lists)."""
        return {k: v for k, v in self._entries.items() if isinstance(v, list)}

    @property
    def prompts(self) -> list[Any] | None:
        """The conditions the rows were asked for (`cond["prompt"]`), or None."""
        p = self._entries.get("prompt")
        return list(p) if p is not None else None

    def where(self, rows: Tensor, other: Cond) -> Cond:
        """Row-wise choice: `other`'s entry where `rows` (B,) is True, this one's elsewhere (e.g. condition
        dropout to the null condition). Entries missing from `other` are kept."""
        rows = rows.reshape(-1).bool()
        out: dict[str, Any] = {}
        for k, v in self._entries.items():
            o = other._entries.get(k) if isinstance(other, Cond) else other.get(k)
            if o is None:
                out[k] = v
            elif isinstance(v, Tensor):
                r = rows.to(v.device).reshape(-1, *([1] * (v.dim() - 1)))
                out[k] = torch.where(r, o.to(v.device), v)
            elif isinstance(v, list):
                out[k] = [b if pick else a for a, b, pick in zip(v, o, rows.tolist(), strict=True)]
            else:
                out[k] = v
        return Cond._from_entries(out, self._batch_size)


def as_cond(value: Any, batch_size: int | None = None) -> Cond:
    """`value` as a `Cond` (dicts of tensors and lists are wrapped)."""
    return Cond.of(value, batch_size)


class Batch(_RowContainer):
    """The one container of algorithm data: named row-aligned fields (tensors, lists, `Cond`,
    `Trajectory`, nested batches) and pass-through values (a generator, the reward, a float) that
    indexing and concatenation leave unchanged. Fields read as attributes: `micro.x_t`.

    >>> b = Batch(x=torch.zeros(4, 2), step=torch.arange(4), generator=None)
    >>> len(b[1:3]), b[1:3].x.shape
    (2, torch.Size([2, 2]))
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._entries[name]
        except KeyError:
            raise AttributeError(f"Batch has no field '{name}'; it has {sorted(self._entries)}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self._entries.get(key, default)


# ---------------------------------------------------------------------------------------------------
# Trajectories and preference pairs
# ---------------------------------------------------------------------------------------------------
class _Batched:
    """Shared batch operations for the dataclasses below (every field is batch-first)."""

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to(self: T, *args: Any, **kwargs: Any) -> T:
        """Move every tensor, like `Tensor.to` (device and/or dtype for floating tensors only)."""
        return _map(self, lambda t: _move(t, args, kwargs))

    def detach(self: T) -> T:
        """A copy whose tensors are cut from the autograd graph."""
        return _map(self, lambda t: t.detach())

    def _rows(self: T, idx: slice | Tensor) -> T:
        return type(self)(**{k: _index(v, idx) for k, v in self._fields().items()})

    def __getitem__(self: T, index: Index) -> T:
        return self._rows(_as_index(index, len(self)))  # type: ignore[arg-type]

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
        cond: the rows' conditioning (`Cond`; a dict is wrapped).
        mask: optional 0/1 tensor, (B, *event) or broadcastable to it after appending trailing singleton
            dims, marking real entries of padded samples.
        rewards: optional (B,) reward of the final sample.
        advantages: optional (B,) or (B, T) advantages.
        extras: anything else batch-first (e.g. group ids, reward terms); non-batched values pass
            through indexing.
    """

    states: Tensor
    timesteps: Tensor
    log_probs: Tensor
    cond: Cond = None  # type: ignore[assignment]
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
        self.cond = Cond.of(self.cond, batch_size=b)

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
        """The final samples, (B, *event) (`extras["x0"]` for a trajectory that keeps only an SDE window)."""
        final = self.extras.get("x0")
        return final if final is not None else self.states[:, -1]


@dataclass
class PreferencePair(_Batched):
    """A batch of (condition, preferred sample, dispreferred sample) in model space.

    Attributes:
        cond: conditioning shared by both samples (`Cond`; a dict is wrapped).
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
        self.cond = Cond.of(self.cond, batch_size=self.winner.shape[0])

    def __len__(self) -> int:
        return self.winner.shape[0]

    @property
    def batch_size(self) -> int:
        return self.winner.shape[0]
