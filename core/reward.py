"""Rewards: the scalar a sample is aligned toward, and the guard that keeps bad scores out of training.

A `Reward` is an `nn.Module` mapping decoded samples (the modality's documented layout) and their
conditioning to one score per sample. Reward models freeze themselves and stay out of checkpoints
(`AlignmentModule` holds them outside its state dict).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.types import Cond

log = logging.getLogger(__name__)

OnInvalid = Literal["raise", "drop"]
# RewardOutput.info keys that are reward terms (per-sample scores of a composite reward), as opposed to
# diagnostics; multi-objective methods (D3PO's Pareto comparison) read these.
TERM_PREFIX = "term/"


@dataclass
class RewardOutput:
    """Scores (B,) plus named per-sample terms or diagnostics to log (`info`)."""

    scores: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


class Reward(nn.Module):
    """Base class for rewards.

    Subclasses implement `forward(samples, cond) -> RewardOutput` (or return a (B,) tensor, which
    `__call__` wraps). `differentiable = True` promises gradients w.r.t. tensor samples (reward
    backprop and guidance check it).
    """

    differentiable: bool = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self._name = name

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    def __call__(self, samples: Any, cond: Cond | None = None) -> RewardOutput:  # type: ignore[override]
        out = super().__call__(samples, cond if cond is not None else {})
        if isinstance(out, RewardOutput):
            return out
        return RewardOutput(scores=torch.as_tensor(out, dtype=torch.float32))

    def freeze(self) -> Reward:
        """Put the reward in eval mode with no trainable parameters (reward models are not trained)."""
        self.requires_grad_(False)
        return self.eval()


class WeightedSum(Reward):
    """Σ wᵢ·rᵢ over several rewards; each term is reported in `info` as "term/<name>" (and logged).

    Args:
        rewards: the terms.
        weights: one weight per term (default 1 each).
    """

    def __init__(
        self, rewards: Sequence[Reward], weights: Sequence[float] | None = None, name: str | None = None
    ) -> None:
        super().__init__(name or "weighted_sum")
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        weights = list(weights) if weights is not None else [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(f"WeightedSum: {len(rewards)} rewards but {len(weights)} weights")
        self.terms = nn.ModuleList(rewards)
        self.weights = weights
        self.differentiable = all(r.differentiable for r in rewards)

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        total, info = None, {}
        names = [r.name for r in self.terms]
        for r, w, n in zip(self.terms, self.weights, names, strict=True):
            out = r(samples, cond)
            key = TERM_PREFIX + (n if names.count(n) == 1 else f"{n}_{len(info)}")
            info[key] = out.scores.detach()
            total = w * out.scores if total is None else total + w * out.scores
        return RewardOutput(scores=total, info=info)


def import_object(path: str) -> Any:
    """Import `package.module.attr` (or `package.module:attr`) and return the attribute."""
    module, _, attr = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"expected a dotted path like 'package.module.function', got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from e


class FunctionReward(Reward):
    """A plain function `fn(samples, cond, **kwargs) -> scores` used as a reward, given by dotted path.

    Args:
        function: dotted path, e.g. "mypkg.rewards.brightness".
        kwargs: extra keyword arguments passed on each call.
        differentiable: whether the function is differentiable in `samples`.
    """

    def __init__(
        self,
        function: str,
        kwargs: dict[str, Any] | None = None,
        differentiable: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name or function.rpartition(".")[2])
        self.function = function
        self.fn: Callable[..., Any] = import_object(function)
        if not callable(self.fn):
            raise ValueError(f"FunctionReward: {function!r} is not callable")
        self.kwargs = dict(kwargs or {})
        self.differentiable = differentiable

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        out = self.fn(samples, cond, **self.kwargs)
        if isinstance(out, RewardOutput):
            return out
        if not isinstance(out, Tensor):
            out = torch.as_tensor([float("nan") if v is None else float(v) for v in out])
        return RewardOutput(scores=out.float())


# ---------------------------------------------------------------------------------------------------
# Guarding against NaN and crashing rewards
# ---------------------------------------------------------------------------------------------------
class RewardError(RuntimeError):
    """A reward produced NaN/inf or raised, and the configuration says to stop."""


def index_samples(samples: Any, idx: Sequence[int]) -> Any:
    """Select rows `idx` of a batch of samples (tensor, list/tuple, or dict of those)."""
    if isinstance(samples, Tensor):
        return samples[torch.as_tensor(list(idx), dtype=torch.long, device=samples.device)]
    if isinstance(samples, Mapping):
        return {k: index_samples(v, idx) for k, v in samples.items()}
    if isinstance(samples, (list, tuple)):
        return type(samples)(samples[i] for i in idx)
    raise TypeError(f"cannot index samples of type {type(samples).__name__}")


def _index_cond(cond: Cond, idx: Sequence[int]) -> Cond:
    return {k: index_samples(v, idx) for k, v in cond.items()}


@dataclass
class ScoredBatch:
    """Guarded reward result: scores (B,) with invalid rows set to NaN, `keep` (B,) bool, reasons."""

    scores: Tensor
    keep: Tensor
    info: dict[str, Tensor]
    reasons: dict[int, str]

    @property
    def num_dropped(self) -> int:
        return int((~self.keep).sum())


class GuardedReward:
    """Calls a reward and applies one policy to NaN/inf scores and exceptions.

    on_invalid="raise": stop with a `RewardError` naming the reward and the first bad sample index.
    on_invalid="drop": mark those samples invalid (`keep` False), count them, and go on; if a whole
    batch is invalid it still raises, since nothing is left to train on.

    When the reward raises on a batch, each sample is scored alone to find which ones fail.
    Also counts reward queries (samples scored), for sample-efficiency reports.
    """

    def __init__(self, reward: Reward, on_invalid: OnInvalid = "raise") -> None:
        if on_invalid not in ("raise", "drop"):
            raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
        self.reward = reward
        self.on_invalid = on_invalid
        self.queries = 0
        self.dropped = 0

    def __call__(self, samples: Any, cond: Cond, batch_size: int) -> ScoredBatch:
        self.queries += batch_size
        reasons: dict[int, str] = {}
        info: dict[str, Tensor] = {}
        try:
            out = self.reward(samples, cond)
            scores = out.scores.reshape(-1)
            info = out.info
            if scores.shape[0] != batch_size:
                raise RewardError(
                    f"reward '{self.reward.name}' returned {scores.shape[0]} scores for {batch_size} samples"
                )
        except RewardError:
            raise
        except Exception as batch_error:  # find the failing rows one by one
            scores = torch.full((batch_size,), float("nan"))
            for i in range(batch_size):
                try:
                    s = self.reward(index_samples(samples, [i]), _index_cond(cond, [i])).scores.reshape(-1)
                    scores[i] = s[0].detach().float().cpu()
                except Exception as e:  # noqa: BLE001 - any reward failure is reported per sample
                    reasons[i] = f"{type(e).__name__}: {e}"
            if not reasons:  # fails only in batch: treat the whole batch as failed
                reasons = {i: f"{type(batch_error).__name__}: {batch_error}" for i in range(batch_size)}
                scores[:] = float("nan")
        finite = torch.isfinite(scores.detach()).cpu()
        for i in (~finite).nonzero().flatten().tolist():
            reasons.setdefault(i, f"score is {scores[i].item()}")
        if reasons:
            first = min(reasons)
            msg = (
                f"reward '{self.reward.name}' failed on {len(reasons)} of {batch_size} samples; "
                f"first at sample index {first}: {reasons[first]}"
            )
            if self.on_invalid == "raise":
                raise RewardError(msg + " (set on_invalid_reward: drop to skip such samples)")
            if len(reasons) == batch_size:
                raise RewardError(msg + " — every sample in the batch failed, nothing to train on")
            log.warning("%s; dropping them", msg)
            self.dropped += len(reasons)
        keep = torch.ones(batch_size, dtype=torch.bool)
        keep[list(reasons)] = False
        return ScoredBatch(scores=scores, keep=keep.to(scores.device), info=info, reasons=reasons)


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------
def batch_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """(R − mean) / (std + eps) over the batch."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


class PerPromptNormalizer:
    """Per-condition reward normalisation with a running buffer per key (DDPO's stat tracker).

    A key's advantage is (R − μ_key)/(σ_key + eps) over the last `buffer_size` rewards seen for that key;
    while a key has fewer than `min_count` rewards, the statistics of the whole batch are used instead.
    Its state is plain data so it can go into a checkpoint.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, list[float]] = {}

    def __call__(self, keys: Sequence[str], rewards: Tensor) -> Tensor:
        r = rewards.detach().float().cpu()
        adv = torch.empty_like(r)
        keys = [str(k) for k in keys]
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            buf = self.buffers.setdefault(key, [])
            buf.extend(r[rows].tolist())
            del buf[: max(0, len(buf) - self.buffer_size)]
            ref = torch.tensor(buf) if len(buf) >= self.min_count else r
            mean, std = ref.mean(), ref.std(unbiased=False)
            adv[rows] = (r[rows] - mean) / (std + self.eps)
        return adv.to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: list(v) for k, v in state.get("buffers", {}).items()}


def cond_keys(cond: Cond, batch_size: int) -> list[str]:
    """A hashable key per row of `cond` (for grouping samples by condition when no prompt is given)."""
    keys = [[] for _ in range(batch_size)]
    for name in sorted(cond):
        v = cond[name]
        if isinstance(v, Tensor):
            flat = v.detach().reshape(batch_size, -1).float().cpu()
            for i in range(batch_size):
                keys[i].append(f"{name}={flat[i].numpy().tobytes().hex()}")
    return ["|".join(k) for k in keys]
