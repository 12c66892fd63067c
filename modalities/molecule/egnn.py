"""An E(n)-equivariant graph network (Satorras et al. 2021) in the form EDM uses (Hoogeboom et al. 2022).

Dense over a padded batch: positions x (B, N, 3), node features h (B, N, F), node mask (B, N, 1). The
graph is fully connected over real atoms only: every message to or from a padded node is multiplied by
zero, so padding never changes real atoms' outputs. Messages use only invariant inputs (features and
squared distances), and coordinates move along relative vectors x_i − x_j, so the output positions
rotate, reflect and translate with the input and features are invariant.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_center(x: Tensor, mask: Tensor) -> Tensor:
    """Subtract the centre of mass of the real atoms (mask (B, N, 1)); padded rows stay zero."""
    n = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    com = (x * mask).sum(dim=1, keepdim=True) / n
    return (x - com) * mask


class EquivariantLayer(nn.Module):
    """One EGNN layer: edge messages, an attention gate, a residual node update and a bounded coordinate
    update (tanh · `coords_range`, EDM's choice that keeps early training stable)."""

    def __init__(self, hidden: int, edge_features: int = 2, coords_range: float = 10.0) -> None:
        super().__init__()
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden + edge_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.att = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.coords_range = coords_range

    def forward(self, h: Tensor, x: Tensor, d0: Tensor, edge_mask: Tensor, node_mask: Tensor):
        b, n, f = h.shape
        diff = x[:, :, None, :] - x[:, None, :, :]  # (B, N, N, 3) x_i − x_j
        d2 = (diff**2).sum(-1, keepdim=True)
        hi = h[:, :, None, :].expand(b, n, n, f)
        hj = h[:, None, :, :].expand(b, n, n, f)
        m = self.edge_mlp(torch.cat([hi, hj, d2, d0], dim=-1))
        m = m * self.att(m) * edge_mask
        h = h + self.node_mlp(torch.cat([h, m.sum(dim=2)], dim=-1))
        h = h * node_mask
        # coordinate update from the updated messages (EDM: separate coordinate pass of the same layer)
        norm = torch.sqrt(d2 + 1e-8) + 1.0
        phi = torch.tanh(self.coord_mlp(m)) * self.coords_range
        x = x + ((diff / norm) * phi * edge_mask).sum(dim=2)
        x = x * node_mask
        return h, x


class EGNN(nn.Module):
    """EGNN dynamics: (x, h, t) -> (x_out − x, h_out) with `num_layers` equivariant layers.

    Args:
        in_features: node feature size (atom one-hot plus any extra features).
        out_features: output feature size.
        hidden: hidden width.
        num_layers: equivariant layers.
        coords_range: bound on each layer's coordinate update (Å).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 96,
        num_layers: int = 4,
        coords_range: float = 15.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features + 1, hidden)  # + time
        self.layers = nn.ModuleList(
            EquivariantLayer(hidden, 2, coords_range / max(num_layers, 1)) for _ in range(num_layers)
        )
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_features))

    def forward(self, x: Tensor, h: Tensor, t: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, 3), h (B, N, F), t (B,) in [0, 1], node_mask (B, N, 1) -> (dx (B, N, 3), h (B, N, F'))."""
        b, n, _ = x.shape
        node_mask = node_mask.to(x.dtype)
        eye = torch.eye(n, device=x.device, dtype=x.dtype)
        edge_mask = (node_mask[:, :, None, :] * node_mask[:, None, :, :]) * (1 - eye)[None, :, :, None]
        x = masked_center(x * node_mask, node_mask)
        d0 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1, keepdim=True)
        tt = t.reshape(b, 1, 1).expand(b, n, 1).to(x.dtype)
        hid = self.embed(torch.cat([h, tt], dim=-1)) * node_mask
        xo = x
        for layer in self.layers:
            hid, xo = layer(hid, xo, d0, edge_mask, node_mask)
        dx = masked_center(xo - x, node_mask)
        return dx, self.out(hid) * node_mask
