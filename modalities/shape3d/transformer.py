"""A Point-E-style transformer over points: permutation-equivariant, masked, with adaLN-Zero conditioning.

Every point is one token (a linear embedding of its coordinates — with `fourier` octaves of sine/cosine
features of them — and colour; no positional encoding, so permuting the points permutes the output),
as in Point-E. The timestep and the condition attributes are embedded and summed into one vector c
that modulates every block the way DiT's adaLN-Zero does: c gives a shift, a scale and a gate for the
layer norm before attention and before the MLP, and the gates start at zero, so every block starts as
the identity. (Point-E prepends its timestep and CLIP tokens instead; on this CPU budget the modulated
blocks learned the primitives in far fewer steps.) Padded points are masked out as keys, so real
points never attend to them, and their outputs are set to exactly 0.
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


def fourier_features(x: Tensor, octaves: int) -> Tensor:
    """x (…, 3) with sin/cos of 2^k·π·x for k < octaves appended (…, 3 + 6·octaves)."""
    if octaves == 0:
        return x
    freqs = math.pi * 2.0 ** torch.arange(octaves, device=x.device, dtype=x.dtype)
    angles = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, angles.sin(), angles.cos()], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block (masked self-attention, then an MLP) modulated by c (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, c: Tensor, keys: Tensor) -> Tensor:
        """h (B, N, width); c (B, width); keys (B, N) bool, True where a token may be attended to."""
        b, n, w = h.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        a = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(a).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        h = h + gate1 * self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class PointTransformer(nn.Module):
    """The denoising network: (B, N, C) points, timesteps, condition ids, mask → (B, N, C).

    Args:
        channels: C, per-point channels (3 coordinates + colour channels).
        attributes: condition attribute → number of values (each gets ids 0..n, 0 = unspecified).
        width, depth, heads: transformer size.
        fourier: octaves of coordinate features.
    """

    def __init__(
        self,
        channels: int,
        attributes: Mapping[str, int],
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        fourier: int = 3,
    ) -> None:
        super().__init__()
        self.channels, self.width, self.fourier = channels, width, fourier
        self.attributes: Sequence[str] = tuple(attributes)
        self.input = nn.Linear(channels + 6 * fourier, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.embed = nn.ModuleDict({a: nn.Embedding(n + 1, width) for a, n in attributes.items()})
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.final = nn.Linear(width, 2 * width)
        self.output = nn.Linear(width, channels)
        for layer in (self.final, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, ids: Mapping[str, Tensor], mask: Tensor) -> Tensor:
        """x (B, N, C); t (B,) timesteps in [0, 1000]; ids: attribute → (B,) long; mask (B, N) real points."""
        c = self.time(timestep_embedding(t, self.width))
        for a in self.attributes:
            c = c + self.embed[a](ids[a])
        feats = torch.cat([fourier_features(x[..., :3], self.fourier), x[..., 3:]], dim=-1)
        h = self.input(feats)
        real = mask > 0
        for block in self.blocks:
            h = block(h, c, real)
        shift, scale = self.final(F.silu(c))[:, None].chunk(2, dim=-1)
        out = self.output(self.norm(h) * (1 + scale) + shift)
        return out * real[..., None].to(out.dtype)
