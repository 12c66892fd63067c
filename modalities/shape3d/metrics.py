"""The metrics 3D generation is judged by: MMD, COV and 1-NNA under the chamfer distance.

Between a set S of generated clouds and a set R of reference clouds (held-out shapes), with
D(a, b) the chamfer distance (`geometry.chamfer_distance`, squared distances, both directions):

- **MMD-CD** (minimum matching distance, lower is better): the mean over references r of
  min_s D(s, r) — how close the generator comes to every reference (fidelity);
- **COV-CD** (coverage, higher is better): the share of references that are the nearest reference of
  at least one generated cloud — a generator that collapses onto a few shapes covers few;
- **1-NNA-CD** (1-nearest-neighbour accuracy, 0.5 is best): the leave-one-out accuracy of a 1-NN
  classifier telling S from R in S ∪ R; 1.0 means the two sets are told apart perfectly (poor fidelity
  or poor diversity), 0.5 that they are indistinguishable.

These are the definitions of Achlioptas et al. (2018) and Yang et al. (PointFlow, 2019) that PVD and
Point-E's successors report. Distances are in world units², on the clouds as they are (no
renormalisation: size is part of the shape here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.modalities.shape3d.geometry import pairwise_chamfer


def mmd_cov(d_sr: Tensor) -> dict[str, float]:
    """MMD and COV from the (|S|, |R|) distance matrix between generated and reference clouds."""
    if d_sr.dim() != 2 or 0 in d_sr.shape:
        raise ValueError(f"need a non-empty (|S|, |R|) distance matrix, got {tuple(d_sr.shape)}")
    mmd = d_sr.min(dim=0).values.mean()
    covered = d_sr.argmin(dim=1).unique().numel()
    return {"mmd": float(mmd), "cov": covered / d_sr.shape[1]}


def one_nna(d_ss: Tensor, d_sr: Tensor, d_rr: Tensor) -> float:
    """Leave-one-out 1-NN accuracy of telling generated (S) from reference (R) clouds, from the three
    distance matrices (|S|,|S|), (|S|,|R|), (|R|,|R|)."""
    ns, nr = d_ss.shape[0], d_rr.shape[0]
    if d_sr.shape != (ns, nr):
        raise ValueError(f"d_sr must be ({ns}, {nr}), got {tuple(d_sr.shape)}")
    full = torch.cat([torch.cat([d_ss, d_sr], 1), torch.cat([d_sr.T, d_rr], 1)], 0).clone()
    full.fill_diagonal_(float("inf"))
    labels = torch.cat([torch.ones(ns), torch.zeros(nr)])
    predicted = labels[full.argmin(dim=1)]
    return float((predicted == labels).float().mean())


def shape_metrics(
    generated: Tensor,
    generated_mask: Tensor | None,
    reference: Tensor,
    reference_mask: Tensor | None,
    backend: str = "auto",
) -> dict[str, float]:
    """MMD-CD, COV-CD and 1-NNA-CD of generated clouds (S, N, 3) against reference clouds (R, M, 3)."""
    d_sr = pairwise_chamfer(generated, reference, generated_mask, reference_mask, backend=backend)
    d_ss = pairwise_chamfer(generated, generated, generated_mask, generated_mask, backend=backend)
    d_rr = pairwise_chamfer(reference, reference, reference_mask, reference_mask, backend=backend)
    out = mmd_cov(d_sr)
    return {
        "mmd_cd": out["mmd"],
        "cov_cd": out["cov"],
        "nna_cd": one_nna(d_ss, d_sr, d_rr),
        "generated": generated.shape[0],
        "reference": reference.shape[0],
    }
