"""Point-set geometry in pure torch, with pytorch3d used where it is installed.

- `nearest_sq_dists(x, y)`: squared distance from every point of x to its nearest real point of y;
- `chamfer_distance(x, y)`: mean over x of that, plus the same from y to x (squared distances, the
  convention of pytorch3d's `chamfer_distance` with point_reduction="mean");
- `knn(x, k)`: the k nearest other real points of every point (squared distances and indices);
- `pairwise_chamfer(a, b)`: the (|a|, |b|) chamfer matrix between two sets of clouds (the metrics).

Every function takes optional masks (B, N) marking real points; padded points are never anyone's
neighbour and count in no mean. Distances are computed in chunks of query points, so memory is bounded
by `chunk` × (points of y) per cloud, never N × M at once for large clouds. Gradients are exact (the
squared differences are formed directly, never through a square root).

`backend`: "torch" (the pure-torch path that CI tests), "pytorch3d" (its `chamfer_distance` /
`knn_points`; raises if it is not installed) or "auto" (pytorch3d when importable and the masks are
prefix masks — padding at the end, the layout of this modality — else torch).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "pytorch3d"]
#: entries of one chunk's distance block (B × chunk × M), about 64 MB of float32
CHUNK_ELEMENTS = 16 * 1024 * 1024


@lru_cache(maxsize=1)
def have_pytorch3d() -> bool:
    """Whether pytorch3d is importable here."""
    try:
        import pytorch3d.loss  # noqa: F401
        import pytorch3d.ops  # noqa: F401
    except ImportError:
        return False
    return True


def _mask(mask: Tensor | None, x: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match points {tuple(x.shape)} (expected (B, N))")
    return mask.to(dtype=x.dtype, device=x.device)


def _check_points(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be points (B, N, D), got {shape}")


def _prefix(mask: Tensor | None) -> Tensor | None:
    """Lengths (B,) if `mask` is 1 on a prefix of each row (or None), else None."""
    if mask is None:
        return None
    lengths = mask.sum(1).round().long()
    ar = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return lengths if torch.equal((ar < lengths[:, None]).to(mask.dtype), mask) else None


def _use_pytorch3d(backend: Backend, *masks: Tensor | None) -> bool:
    if backend == "torch":
        return False
    if backend == "pytorch3d":
        if not have_pytorch3d():
            raise ImportError("backend='pytorch3d' needs pytorch3d, which is not installed here")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'pytorch3d', got {backend!r}")
    return have_pytorch3d() and all(m is None or _prefix(m) is not None for m in masks)


def _lengths(mask: Tensor | None, x: Tensor) -> Tensor:
    if mask is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    lengths = _prefix(mask)
    if lengths is None:
        raise ValueError("pytorch3d needs padding at the end of each row (a prefix mask)")
    return lengths


def _chunk(x: Tensor, y: Tensor, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return chunk
    return max(1, CHUNK_ELEMENTS // max(1, x.shape[0] * y.shape[1]))


def nearest_sq_dists(
    x: Tensor,
    y: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """(B, N) squared distance from each point of x (B, N, D) to its nearest real point of y (B, M, D)
    (pure torch, chunked over x's points). Padded rows of x get 0."""
    _check_points(x, "x")
    _check_points(y, "y")
    xm, ym = _mask(x_mask, x), _mask(y_mask, y)
    if (ym.sum(1) == 0).any():
        raise ValueError("a cloud of y has no real point: its nearest distances are undefined")
    step = _chunk(x, y, chunk)
    far = torch.finfo(x.dtype).max
    out = []
    for i in range(0, x.shape[1], step):
        d = (x[:, i : i + step, None, :] - y[:, None, :, :]).pow(2).sum(-1)  # (B, c, M)
        d = torch.where(ym[:, None, :] > 0, d, torch.full_like(d, far))
        out.append(d.min(dim=2).values)
    return torch.cat(out, dim=1) * xm


def chamfer_distance(
    x: Tensor,
    y: Tensor,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    chunk: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """(B,) chamfer distance: mean over x's real points of the squared distance to the nearest real
    point of y, plus the same from y to x."""
    _check_points(x, "x")
    _check_points(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need one batch size, got {x.shape[0]} and {y.shape[0]}")
    if _use_pytorch3d(backend, x_mask, y_mask):
        from pytorch3d.loss import chamfer_distance as p3d_chamfer

        loss, _ = p3d_chamfer(
            x.float(),
            y.float(),
            x_lengths=_lengths(x_mask, x),
            y_lengths=_lengths(y_mask, y),
            batch_reduction=None,
            point_reduction="mean",
        )
        return loss
    xm, ym = _mask(x_mask, x), _mask(y_mask, y)
    to_y = nearest_sq_dists(x, y, xm, ym, chunk).sum(1) / xm.sum(1).clamp_min(1)
    to_x = nearest_sq_dists(y, x, ym, xm, chunk).sum(1) / ym.sum(1).clamp_min(1)
    return to_y + to_x


def knn(
    x: Tensor, k: int, mask: Tensor | None = None, chunk: int | None = None, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """The k nearest *other* real points of every point of x (B, N, D): squared distances (B, N, k)
    ascending and indices (B, N, k). Rows of padded points hold 0 distances and index 0; a cloud needs
    more than k real points."""
    _check_points(x, "x")
    m = _mask(mask, x)
    if (m.sum(1) <= k).any():
        raise ValueError(f"knn with k={k} needs more than {k} real points in every cloud")
    if _use_pytorch3d(backend, mask):
        from pytorch3d.ops import knn_points

        lengths = _lengths(mask, x)
        res = knn_points(x.float(), x.float(), lengths1=lengths, lengths2=lengths, K=k + 1)
        d, idx = res.dists[..., 1:], res.idx[..., 1:]  # the first neighbour is the point itself
        return d * m[..., None], idx * m[..., None].long()
    step = _chunk(x, x, chunk)
    far = torch.finfo(x.dtype).max
    ds, ids = [], []
    ar = torch.arange(x.shape[1], device=x.device)
    for i in range(0, x.shape[1], step):
        d = (x[:, i : i + step, None, :] - x[:, None, :, :]).pow(2).sum(-1)  # (B, c, N)
        valid = (m[:, None, :] > 0) & (ar[i : i + step, None] != ar[None, :])[None]
        d = torch.where(valid, d, torch.full_like(d, far))
        top = d.topk(k, dim=2, largest=False)
        ds.append(top.values)
        ids.append(top.indices)
    d, idx = torch.cat(ds, 1), torch.cat(ids, 1)
    return d * m[..., None], idx * m[..., None].long()


@torch.no_grad()
def pairwise_chamfer(
    a: Tensor,
    b: Tensor,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    rows_at_once: int = 64,
    backend: Backend = "auto",
) -> Tensor:
    """(|a|, |b|) chamfer distances between every cloud of `a` (A, N, D) and every cloud of `b` (B, M, D),
    `rows_at_once` pairs per call (no gradient)."""
    _check_points(a, "a")
    _check_points(b, "b")
    am, bm = _mask(a_mask, a), _mask(b_mask, b)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    nb = b.shape[0]
    pairs = [(i, j) for i in range(a.shape[0]) for j in range(nb)]
    for s in range(0, len(pairs), rows_at_once):
        chunk = pairs[s : s + rows_at_once]
        ia = torch.tensor([i for i, _ in chunk], device=a.device)
        ib = torch.tensor([j for _, j in chunk], device=a.device)
        d = chamfer_distance(a[ia], b[ib], am[ia], bm[ib], backend=backend)
        out[ia, ib] = d.float()
    return out
