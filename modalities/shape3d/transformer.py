"""A Point-E-style transformer over points: permutation-equivariant, masked, conditioned by prefix tokens.

Every point is one token (a linear embedding of its coordinates and colour; no positional encoding, so
permuting the points permutes the output). The timestep and each condition attribute add one prefix
token (Point-E prepends its timestep and CLIP tokens the same way), and their sum is also added to every
point token. Pre-norm blocks of masked multi-head self-attention and an MLP follow; padded points are
masked out as keys, so real points never attend to them, and their outputs are set to exactly 0. The
output projection starts at zero (the untrained model predicts 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal features (B, dim) of timesteps t (B,) in [0, max_period]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * (1000.0 / max_period) * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: masked self-attention, then an MLP (width × `mlp_ratio`)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h: Tensor, keys: Tensor) -> Tensor:
        """h (B, L, width); keys (B, L) bool, True where a token may be attended to."""
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class PointTransformer(nn.Module):
    """The denoising network: (B, N, C) points, timesteps, condition ids, mask → (B, N, C).

    Args:
        channels: C, per-point channels (3 coordinates + colour channels).
        attributes: condition attribute → number of values (each gets ids 0..n, 0 = unspecified).
        width, depth, heads: transformer size.
    """

    def __init__(
        self, channels: int, attributes: Mapping[str, int], width: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        self.channels, self.width = channels, width
        self.attributes: Sequence[str] = tuple(attributes)
        self.input = nn.Linear(channels, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.embed = nn.ModuleDict({a: nn.Embedding(n + 1, width) for a, n in attributes.items()})
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, channels)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, t: Tensor, ids: Mapping[str, Tensor], mask: Tensor) -> Tensor:
        """x (B, N, C); t (B,) timesteps in [0, 1000]; ids: attribute → (B,) long; mask (B, N) real points."""
        b = x.shape[0]
        prefix = [self.time(timestep_embedding(t, self.width))] + [
            self.embed[a](ids[a]) for a in self.attributes
        ]
        tokens = torch.stack(prefix, dim=1)  # (B, P, width)
        h = self.input(x) + tokens.sum(1, keepdim=True)
        h = torch.cat([tokens, h], dim=1)
        real = mask > 0
        keys = torch.cat([torch.ones((b, tokens.shape[1]), dtype=torch.bool, device=x.device), real], dim=1)
        for block in self.blocks:
            h = block(h, keys)
        out = self.output(self.norm(h[:, tokens.shape[1] :]))
        return out * real[..., None].to(out.dtype)
