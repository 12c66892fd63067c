"""Rewards for the 2-D toy modality (samples are (B, 2) points)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond


class TargetRegion(Reward):
    """exp(−‖x − center‖² / (2·radius²)): 1 at the centre, falling off with distance. Differentiable.

    Args:
        center: the target point.
        radius: length scale of the bump.
    """

    differentiable = True

    def __init__(self, center: Sequence[float] = (0.0, 0.0), radius: float = 1.0) -> None:
        super().__init__("target_region")
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.register_buffer("center", torch.tensor(list(center), dtype=torch.float32), persistent=False)
        self.radius = radius

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        if samples.dim() != 2 or samples.shape[1] != self.center.shape[0]:
            raise ValueError(
                f"TargetRegion expects (B, {self.center.shape[0]}) points, got {tuple(samples.shape)}"
            )
        d2 = ((samples.float() - self.center) ** 2).sum(-1)
        return RewardOutput(
            scores=torch.exp(-d2 / (2 * self.radius**2)), info={"distance": d2.sqrt().detach()}
        )


class PointScorer(nn.Module):
    """A small MLP scoring 2-D points: the network of a toy reward model (see RewardModelModule).

    Args:
        hidden: hidden width.
    """

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, samples: Tensor, prompts: object = None) -> Tensor:
        return self.net(samples.float()).squeeze(-1)
