"""The conditioner of the moving-digit model: one learned token per part of the condition.

A condition (text, dict or int; `conditions.parse_condition`) becomes three ids — digit, direction,
speed — each with its own embedding table whose last row is that slot's null (open) id. `forward` gives
(B, 3, D) hidden states: the three slot embeddings plus a slot-position embedding and a residual MLP.
The null condition of classifier-free guidance leaves all three slots open.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.modalities.video.conditions import NULL_IDS, condition_ids, parse_condition


class MotionConditioner(nn.Module):
    """Embeddings of (digit, direction, speed) for the UNet's cross-attention and pooled path.

    Args:
        embed_dim: D, the width of the hidden states (the UNet's `cross_attention_dim`).
    """

    num_tokens = 3

    def __init__(self, embed_dim: int = 32) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.tables = nn.ModuleList(nn.Embedding(n + 1, embed_dim) for n in NULL_IDS)
        self.position = nn.Parameter(torch.zeros(self.num_tokens, embed_dim))
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.out = nn.Linear(embed_dim, embed_dim)
        nn.init.normal_(self.position, std=0.02)

    def encode(self, prompts: Sequence[Any]) -> dict[str, Tensor]:
        """`{"motion_ids": (B, 3) long}` for a list of conditions (on the module's device)."""
        if isinstance(prompts, (str, Mapping)):
            raise TypeError("encode expects a list of conditions, got a single one")
        ids = condition_ids([parse_condition(p) for p in prompts])
        return {"motion_ids": ids.to(self.position.device)}

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every slot open, for every row."""
        ids = cond["motion_ids"]
        return {"motion_ids": torch.tensor(NULL_IDS, device=ids.device).expand_as(ids).clone()}

    def forward(self, ids: Tensor) -> Tensor:
        """(B, 3) ids → (B, 3, D) hidden states."""
        h = torch.stack([table(ids[:, k]) for k, table in enumerate(self.tables)], dim=1) + self.position
        return h + self.out(self.mlp(h))
