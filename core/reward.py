"""Rewards: the scalar a sample is aligned toward, and the guard that keeps bad scores out of training.

A `Reward` is an `nn.Module` mapping decoded samples (the modality's documented layout) and their
conditioning (`Cond`: prompt text and metadata under "prompt", plus the backbone's tensors) to one
score per sample. It declares what it needs decoded (`request`, keyword arguments for
`Backbone.decode`: some frames of a video, a window of audio, views of a shape), and it may score per
element (e.g. per frame, (B, F)) with a declared `reduction` to (B,); the per-element scores are kept
in `RewardOutput.elements` and logged.

`SampleView` is how the core hands model-space samples to rewards: it decodes on demand, once per
distinct request, in chunks of `backbone.decode_chunk_size` rows. `Reward.evaluate(view, cond)` is the
one place a reward meets model-space samples; `WeightedSum` evaluates each term on its own request.

Reward models freeze themselves and stay out of checkpoints (`AlignmentModule` holds them outside its
state dict).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.functional import expand_mask
from diffalign.core.types import Batch, Cond, _cat, as_cond

log = logging.getLogger(__name__)

OnInvalid = Literal["raise", "drop"]
Reduction = Literal["mean", "min", "max", "sum"]
# RewardOutput.info keys that are reward terms (per-sample scores of a composite reward), as opposed to
# diagnostics; multi-objective methods (D3PO's Pareto comparison) read these.
TERM_PREFIX = "term/"


class RewardError(RuntimeError):
    """A reward produced NaN/inf, raised, or returned scores of the wrong shape, and the configuration
    says to stop."""


class RewardShapeError(RewardError):
    """A reward returned something other than one score per sample (or declared per-element scores)."""


class RewardUnavailableError(RewardError):
    """The reward could not be computed at all (a reward server that stays unreachable or refuses the
    client): no fault of the samples, so it is never retried sample by sample, dropped or scored NaN."""


@dataclass
class RewardOutput:
    """Scores (B,), named per-sample terms or diagnostics to log (`info`), and, for a reward that
    scores per element, the per-element scores (B, E) before its reduction."""

    scores: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)
    elements: Tensor | None = None


def _reduce(elements: Tensor, how: str) -> Tensor:
    if how == "mean":
        return elements.mean(dim=1)
    if how == "sum":
        return elements.sum(dim=1)
    if how == "min":
        return elements.min(dim=1).values
    if how == "max":
        return elements.max(dim=1).values
    raise ValueError(f"unknown reduction {how!r} (mean, min, max or sum)")


def check_scores(reward: Reward, out: RewardOutput, batch_size: int) -> RewardOutput:
    """`out` with scores exactly (B,): per-element (B, E) scores are reduced by the reward's declared
    `reduction`; any other shape raises `RewardShapeError` naming the reward and the shapes."""
    scores = out.scores
    if scores.dim() == 1 and scores.shape[0] == batch_size:
        return out
    if scores.dim() == 2 and scores.shape[0] == batch_size and reward.reduction is not None:
        reduced = _reduce(scores.float(), reward.reduction)
        return RewardOutput(scores=reduced, info=out.info, elements=scores)
    allowed = f"({batch_size},)" + (
        f" or ({batch_size}, E) reduced by '{reward.reduction}'" if reward.reduction else ""
    )
    hint = "" if reward.reduction else " (declare `reduction` to return per-element scores (B, E))"
    raise RewardShapeError(
        f"reward '{reward.name}' returned scores of shape {tuple(scores.shape)} for {batch_size} samples; "
        f"expected {allowed}{hint}"
    )


def _as_output(out: Any) -> RewardOutput:
    if isinstance(out, RewardOutput):
        scores = out.scores
        if not isinstance(scores, Tensor):
            scores = torch.as_tensor(scores)
        return RewardOutput(scores=scores.float(), info=out.info, elements=out.elements)
    if isinstance(out, Tensor):
        return RewardOutput(scores=out.float())
    try:
        import numpy as np

        if isinstance(out, np.ndarray):
            return RewardOutput(scores=torch.as_tensor(out).float())
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    values = [float("nan") if v is None else float(v) for v in out]
    return RewardOutput(scores=torch.tensor(values, dtype=torch.float32))


class Reward(nn.Module):
    """Base class for rewards.

    Subclasses implement `forward(samples, cond) -> RewardOutput` (or return a (B,) tensor, an array or
    a list, which `__call__` wraps). `cond` is the batch's `Cond`: `cond["prompt"]` holds the conditions
    the samples were asked for (strings or dicts) when there are any.

    Attributes:
        differentiable: promises gradients w.r.t. tensor samples (reward backprop and guidance check it).
        request: keyword arguments for `Backbone.decode` — what this reward needs decoded (default:
            the whole sample).
        reduction: for a reward that returns per-element scores (B, E): how they reduce to (B,)
            ("mean", "min", "max", "sum"); None means scores must be (B,).
        reader: class path of the reader that loads files into this reward's sample layout, for
            `diffalign score` (e.g. "diffalign.modalities.image.io.ImageReader"); None: give --reader.
    """

    differentiable: bool = False
    reduction: Reduction | None = None
    reader: str | None = None

    def __init__(self, name: str | None = None, request: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._name = name
        self.request: dict[str, Any] = dict(request or {})

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    def __call__(self, samples: Any, cond: Cond | Mapping[str, Any] | None = None) -> RewardOutput:  # type: ignore[override]
        """`forward` with its output as a `RewardOutput` (per-element scores reduced by `reduction`)."""
        if not isinstance(cond, Cond):
            cond = as_cond(cond, None) if cond else Cond.empty(_num_samples(samples) or 0)
        out = _as_output(super().__call__(samples, cond))
        if out.scores.dim() == 2 and self.reduction is not None:
            out = RewardOutput(_reduce(out.scores, self.reduction), out.info, elements=out.scores)
        return out

    def evaluate(self, view: SampleView, cond: Cond) -> RewardOutput:
        """Score the samples of `view` decoded the way this reward asks (`request`); the scores are
        checked to be one per sample (`check_scores`)."""
        return check_scores(self, self(view.get(self.request), cond), len(view))

    def freeze(self) -> Reward:
        """Put the reward in eval mode with no trainable parameters (reward models are not trained)."""
        self.requires_grad_(False)
        return self.eval()


def _num_samples(samples: Any) -> int | None:
    if isinstance(samples, Tensor):
        return samples.shape[0] if samples.dim() > 0 else None
    if isinstance(samples, Mapping):
        for v in samples.values():
            n = _num_samples(v)
            if n is not None:
                return n
        return None
    if isinstance(samples, (list, tuple)):
        return len(samples)
    return None


class SampleView:
    """A batch of final samples as rewards see them: decoded on demand, per request, in chunks.

    Built from model space (`backbone`, `x0`, `mask`): `get(request)` calls
    `backbone.decode(x0, mask, **request)` once per distinct request (cached), `backbone.decode_chunk_size`
    rows at a time, keeping the autograd graph when x0 has one (reward backprop). Padded entries are
    zeroed first. A non-empty request also gets `generator=` (this view's generator) for backbones that
    honour random requests (one random frame). Built from decoded `samples` (files to score, test
    doubles): `get` returns them whatever the request.
    """

    def __init__(
        self,
        backbone: Any = None,
        x0: Tensor | None = None,
        mask: Tensor | None = None,
        samples: Any = None,
        size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if samples is None and (backbone is None or x0 is None):
            raise ValueError("SampleView needs (backbone, x0) or decoded samples")
        self.backbone, self.x0, self.mask, self.samples = backbone, x0, mask, samples
        self.generator = generator
        self._size = size if size is not None else (x0.shape[0] if x0 is not None else _num_samples(samples))
        if self._size is None:
            raise ValueError("SampleView: cannot tell the number of samples; pass size")
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return self._size

    @classmethod
    def of(cls, samples: Any, size: int | None = None) -> SampleView:
        """Decoded samples (or a view) as a view."""
        return samples if isinstance(samples, SampleView) else cls(samples=samples, size=size)

    def get(self, request: Mapping[str, Any] | None = None) -> Any:
        """The samples decoded with `request` (a dict of `Backbone.decode` options)."""
        if self.samples is not None:
            return self.samples
        request = dict(request or {})
        key = repr(sorted(request.items()))
        if key not in self._cache:
            chunk = getattr(self.backbone, "decode_chunk_size", None) or self._size
            x0 = self.x0
            if self.mask is not None:  # padding is exactly zero for decoders, and gets no gradient
                x0 = torch.where(expand_mask(self.mask, x0) > 0, x0, torch.zeros_like(x0))
            options = {**request, "generator": self.generator} if request else {}
            parts = [
                self.backbone.decode(
                    x0[i : i + chunk],
                    None if self.mask is None else self.mask[i : i + chunk],
                    **options,
                )
                for i in range(0, self._size, chunk)
            ]
            self._cache[key] = parts[0] if len(parts) == 1 else _cat(parts)
        return self._cache[key]

    def rows(self, idx: Sequence[int]) -> SampleView:
        """The view of rows `idx` (decodes them afresh)."""
        if self.samples is not None:
            return SampleView(samples=index_samples(self.samples, idx), size=len(idx))
        rows = torch.as_tensor(list(idx), dtype=torch.long, device=self.x0.device)
        mask = None if self.mask is None else self.mask[rows]
        return SampleView(self.backbone, self.x0[rows], mask, generator=self.generator)


def score(reward: Reward, view: SampleView, cond: Cond) -> RewardOutput:
    """`reward.evaluate(view, cond)`: the scores of model-space (or decoded) samples."""
    return reward.evaluate(view, as_cond(cond, len(view)))


class WeightedSum(Reward):
    """Σ wᵢ·rᵢ over several rewards; each term is reported in `info` as "term/<name>" (and logged).

    Each term is evaluated on its own decode request (a per-frame image reward and a temporal reward of
    one video batch decode differently; equal requests decode once).

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

    def term_names(self) -> list[str]:
        names = [r.name for r in self.terms]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def _combine(self, outputs: Sequence[RewardOutput]) -> RewardOutput:
        total, info = None, {}
        for w, n, out in zip(self.weights, self.term_names(), outputs, strict=True):
            info[TERM_PREFIX + n] = out.scores.detach()
            for k, v in out.info.items():
                info[f"{n}/{k}"] = v
            if out.elements is not None:
                info[f"{n}/elements"] = out.elements.detach()
            total = w * out.scores if total is None else total + w * out.scores
        return RewardOutput(scores=total, info=info)

    def evaluate(self, view: SampleView, cond: Cond) -> RewardOutput:
        return self._combine([r.evaluate(view, cond) for r in self.terms])

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        view = SampleView.of(samples)
        return self._combine([r.evaluate(view, cond) for r in self.terms])


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
        request: decode options (see `Reward.request`).
        reduction: for per-element scores (see `Reward.reduction`).
    """

    def __init__(
        self,
        function: str,
        kwargs: dict[str, Any] | None = None,
        differentiable: bool = False,
        name: str | None = None,
        request: dict[str, Any] | None = None,
        reduction: Reduction | None = None,
    ) -> None:
        super().__init__(name or function.rpartition(".")[2], request)
        self.function = function
        self.fn: Callable[..., Any] = import_object(function)
        if not callable(self.fn):
            raise ValueError(f"FunctionReward: {function!r} is not callable")
        self.kwargs = dict(kwargs or {})
        self.differentiable = differentiable
        self.reduction = reduction

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        return _as_output(self.fn(samples, cond, **self.kwargs))


class LearnedReward(Reward):
    """A trained scoring network used as a reward (frozen; differentiable if the network is).

    The network is called as `network(samples, cond["prompt"])` (None when the rows have no prompts),
    the contract `RewardModelModule` trains it under.

    Args:
        network: the same architecture that `RewardModelModule` trained.
        weights: its exported safetensors (path or pkg:// spec).
        name: reward name for logs.
    """

    differentiable = True

    def __init__(self, network: nn.Module, weights: str, name: str = "learned_reward") -> None:
        super().__init__(name)
        from diffalign.core.io import load_state_dict

        load_state_dict(network, weights)
        self.network = network
        self.freeze()

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        self.network.to(samples.device)  # a frozen reward may live outside a LightningModule
        out = self.network(samples, cond.get("prompt"))
        return RewardOutput(scores=out.reshape(samples.shape[0]).float())


# ---------------------------------------------------------------------------------------------------
# Guarding against NaN, crashing and misshapen rewards
# ---------------------------------------------------------------------------------------------------
def index_samples(samples: Any, idx: Sequence[int]) -> Any:
    """Select rows `idx` of a batch of decoded samples (tensor, list/tuple, dict of those, or a `Batch`/
    `Cond` layout, which keeps its class and its pass-through values such as a sample rate)."""
    if isinstance(samples, (Batch, Cond)):
        return samples.index(list(idx))
    if isinstance(samples, Tensor):
        return samples[torch.as_tensor(list(idx), dtype=torch.long, device=samples.device)]
    if isinstance(samples, Mapping):
        return {k: index_samples(v, idx) for k, v in samples.items()}
    if isinstance(samples, (list, tuple)):
        return type(samples)(samples[i] for i in idx)
    raise TypeError(f"cannot index samples of type {type(samples).__name__}")


@dataclass
class ScoredBatch:
    """Guarded reward result: scores (B,) with invalid rows set to NaN, `keep` (B,) bool, reasons,
    per-sample info and, for per-element rewards, the element scores (B, E)."""

    scores: Tensor
    keep: Tensor
    info: dict[str, Tensor]
    reasons: dict[int, str]
    elements: Tensor | None = None

    @property
    def num_dropped(self) -> int:
        return int((~self.keep).sum())


class GuardedReward:
    """Calls a reward and applies one policy to NaN/inf scores, exceptions and wrong shapes.

    on_invalid="raise": stop with a `RewardError` naming the reward and the first bad sample index.
    on_invalid="drop": mark those samples invalid (`keep` False), count them, and go on; if a whole
    batch is invalid it still raises, since nothing is left to train on. A reward that returns the
    wrong shape raises `RewardShapeError` under either policy (its scores cannot be matched to samples).

    When the reward raises on a batch, each sample is scored alone to find which ones fail.
    Also counts reward queries (samples scored) and dropped samples, for reports.
    """

    def __init__(self, reward: Reward, on_invalid: OnInvalid = "raise") -> None:
        if on_invalid not in ("raise", "drop"):
            raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
        self.reward = reward
        self.on_invalid = on_invalid
        self.queries = 0
        self.dropped = 0

    def __call__(self, samples: SampleView | Any, cond: Cond, batch_size: int | None = None) -> ScoredBatch:
        scored = evaluate_rows(self.reward, samples, cond, batch_size)
        n, reasons = len(scored.keep), scored.reasons
        self.queries += n
        if reasons:
            first = min(reasons)
            msg = (
                f"reward '{self.reward.name}' failed on {len(reasons)} of {n} samples; "
                f"first at sample index {first}: {reasons[first]}"
            )
            if self.on_invalid == "raise":
                raise RewardError(msg + " (set on_invalid_reward: drop to skip such samples)")
            if len(reasons) == n:
                raise RewardError(msg + " — every sample in the batch failed, nothing to train on")
            log.warning("%s; dropping them", msg)
            self.dropped += len(reasons)
        return scored


def evaluate_rows(
    reward: Reward,
    samples: SampleView | Any,
    cond: Cond | Mapping[str, Any] | None,
    batch_size: int | None = None,
) -> ScoredBatch:
    """Score a batch and say, per row, why a row has no score (no policy: `GuardedReward` adds one).

    A row fails when its score (or one of its element scores) is NaN/inf; the reason is then the one the
    reward gives in `last_invalid_reasons` ({row: reason}, for rewards that score failures as a value),
    else "score is nan". When the reward raises on the batch, each row is scored alone to find the
    failing ones (reason: the exception). A wrong shape raises `RewardShapeError`.
    """
    view = SampleView.of(samples, batch_size)
    n = len(view)
    cond = as_cond(cond if cond is not None else Cond.empty(n), n)
    reasons: dict[int, str] = {}
    info: dict[str, Tensor] = {}
    elements = None
    own: dict[int, str] = {}
    try:
        out = reward.evaluate(view, cond)
        scores, info, elements = out.scores, out.info, out.elements
        own = dict(getattr(reward, "last_invalid_reasons", None) or {})
    except (RewardShapeError, RewardUnavailableError):  # the reward, not a row, is at fault
        raise
    except Exception as batch_error:  # find the failing rows one by one
        scores = torch.full((n,), float("nan"))
        for i in range(n):
            try:
                s = reward.evaluate(view.rows([i]), cond[[i]]).scores
                scores[i] = s[0].detach().float().cpu()
                why = (getattr(reward, "last_invalid_reasons", None) or {}).get(0)
                if why is not None:
                    own[i] = why
            except (RewardShapeError, RewardUnavailableError):
                raise
            except Exception as e:  # noqa: BLE001 - any reward failure is reported per sample
                reasons[i] = f"{type(e).__name__}: {e}"
        if not reasons:  # fails only in batch: treat the whole batch as failed
            reasons = {i: f"{type(batch_error).__name__}: {batch_error}" for i in range(n)}
            scores[:] = float("nan")
    finite = torch.isfinite(scores.detach()).cpu()
    if elements is not None:
        finite &= torch.isfinite(elements.detach()).all(dim=1).cpu()
    for i in (~finite).nonzero().flatten().tolist():
        what = own.get(i) or f"score is {scores[i].item()}"
        if elements is not None and torch.isfinite(scores[i]).item():
            what = "a per-element score is not finite"
        reasons.setdefault(i, what)
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(reasons)] = False
    return ScoredBatch(
        scores=scores, keep=keep.to(scores.device), info=info, reasons=reasons, elements=elements
    )


def reward_metrics(scored: ScoredBatch, prefix: str = "reward/") -> dict[str, float]:
    """Means of the kept rows of every per-sample info entry and of each element column (logged)."""
    keep = scored.keep.cpu()
    n = keep.shape[0]
    metrics: dict[str, float] = {}
    for name, v in scored.info.items():
        v = torch.as_tensor(v).detach().float().cpu()
        if v.dim() >= 1 and v.shape[0] == n:
            v = v[keep]
        if v.numel():
            metrics[f"{prefix}{name}"] = float(v.mean())
    if scored.elements is not None:
        e = scored.elements.detach().float().cpu()[keep]
        if e.numel():
            for j in range(min(e.shape[1], 32)):
                metrics[f"{prefix}element_{j}"] = float(e[:, j].mean())
    return metrics
