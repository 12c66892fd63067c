"""Small rank-agnostic tensor helpers shared by kernels, policies and algorithms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import repeat
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def left_broadcast(value: Tensor | float, shape: torch.Size | Sequence[int]) -> Tensor:
    """Reshape a scalar or per-sample `(B,)` tensor so it broadcasts against `shape` of any rank."""
    value = torch.as_tensor(value)
    ndim = len(shape)
    if value.dim() == 0:
        return value.reshape((1,) * ndim)
    return value.reshape(value.shape + (1,) * (ndim - value.dim()))


def randn(
    shape: Sequence[int], generator: Generator = None, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal noise, with one generator for the batch or one generator per sample.

    With a list of generators, row i depends only on generator i: a sample's noise does not change with
    the batch it is drawn in (what fixed evaluation seeds need).
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
        return out.to(device) if device is not None else out
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]
    out = torch.cat(rows, dim=0)
    return out.to(device) if device is not None else out


def masked_noise(
    shape: Sequence[int],
    generator: Generator = None,
    mask: Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise (as `randn`) that is exactly 0 where `mask` is 0.

    The one way the core draws noise for padded samples: kernels, training noise, pair noising,
    candidate states and test-time methods all call it, so padded entries never get noise.
    """
    noise = randn(shape, generator, device=device, dtype=dtype)
    m = expand_mask(mask, noise)
    return noise if m is None else noise * m


def expand_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """Broadcast a (B, ...) mask to the full shape of `like` (float), or None."""
    if mask is None:
        return None
    m = mask.to(dtype=like.dtype, device=like.device)
    while m.dim() < like.dim():
        m = m.unsqueeze(-1)
    return m.expand_as(like)


def reduce_event(x: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reduce every dim after the batch dim by mean or sum, counting only unmasked entries."""
    dims = tuple(range(1, x.dim()))
    if mask is None:
        return x.mean(dim=dims) if reduction == "mean" else x.sum(dim=dims)
    m = expand_mask(mask, x)
    total = (x * m).sum(dim=dims)
    if reduction == "sum":
        return total
    return total / m.sum(dim=dims).clamp_min(1.0)


def gaussian_log_prob(
    x: Tensor, mean: Tensor, std: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Log-density of `x` under N(mean, std²) per sample, reduced over the event dims.

    `std` broadcasts against `x`. Where std is 0 the transition is deterministic and contributes 0.
    """
    std = std.expand_as(x) if std.shape != x.shape else std
    deterministic = std <= 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    lp = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - LOG_SQRT_2PI
    lp = torch.where(deterministic, torch.zeros_like(lp), lp)
    return reduce_event(lp, mask, reduction)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error over unmasked event entries, shape (B,)."""
    return reduce_event((pred.float() - target.float()) ** 2, mask, "mean")


def gaussian_kl_same_std(
    mean_p: Tensor, mean_q: Tensor, std: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """KL(N(mean_p, std²) ‖ N(mean_q, std²)) = ‖mean_p − mean_q‖² / (2 std²) per sample.

    Reduced over event dims like the kernels' log-probs; entries with std 0 (deterministic steps)
    contribute 0.
    """
    std = std.expand_as(mean_p) if std.shape != mean_p.shape else std
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = torch.where(std > 0, (mean_p - mean_q) ** 2 / (2 * safe**2), torch.zeros_like(mean_p))
    return reduce_event(kl, mask, reduction)


def repeat_rows(x: Tensor, n: int) -> Tensor:
    """Every row of a batch-first tensor repeated n times in place (row i → rows i·n … i·n+n−1)."""
    return x if n == 1 else repeat(x, "b ... -> (b n) ...", n=n)


def repeat_batch(batch: dict, n: int) -> dict:
    """Repeat every row of a data batch n times in place order (row i → rows i·n … i·n+n−1)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0:
            out[k] = repeat_rows(v, n)
        elif isinstance(v, (list, tuple)):
            out[k] = [item for item in v for _ in range(n)]
        else:
            out[k] = v
    return out


def pad_along(x: Tensor, size: int, dim: int, value: float = 0.0) -> Tensor:
    """`x` padded with `value` at the end of dimension `dim` to length `size` (unchanged if already)."""
    extra = size - x.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad dim {dim} of length {x.shape[dim]} down to {size}")
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def pad_stack(items: Sequence[Tensor], axis: int) -> tuple[Tensor, Tensor]:
    """Stack samples whose event axis `axis` differs in length: zero-pad to the longest and return
    (batch (B, *event), mask) with the mask (B, *event[: axis + 1]) 1 on real entries (other dims 1)."""
    if not items:
        raise ValueError("pad_stack needs at least one sample")
    ref = items[0]
    for i, x in enumerate(items):
        if x.dim() != ref.dim() or any(
            a != b for d, (a, b) in enumerate(zip(x.shape, ref.shape, strict=True)) if d != axis
        ):
            raise ValueError(
                f"sample {i} has shape {tuple(x.shape)}; samples may differ only along axis {axis} "
                f"(sample 0: {tuple(ref.shape)})"
            )
    size = max(x.shape[axis] for x in items)
    batch = torch.stack([pad_along(x, size, axis) for x in items])
    lengths = torch.tensor([x.shape[axis] for x in items], device=batch.device)
    valid = (torch.arange(size, device=batch.device)[None, :] < lengths[:, None]).float()
    mask = valid.reshape(len(items), *([1] * axis), size)
    return batch, mask
