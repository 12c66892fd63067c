"""D3PO: online DPO on pairs of the model's own trajectories, step by step.

Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model",
arXiv:2311.13231. For each condition, sample two trajectories from the same initial noise; a judge
(here the reward) says which final sample is better. With `pareto: true` and a reward that reports
per-sample terms (e.g. `WeightedSum`), the comparison is Pareto dominance over the terms: the sample
at least as good on every term and better on one wins; incomparable or equal pairs are skipped — or,
with `keep_undecided: true`, kept with preference h = 0 as the reference implementation does (their
loss is log 2 with zero gradient, so the mean over pairs scales the gradient by the decided fraction).
Every denoising step of the winner and loser is then a DPO comparison of single transitions:

    ρ = clamp(π_θ(a|s) / π_ref(a|s), 1 − ε, 1 + ε)
    loss = −log σ(β·(log ρʷ − log ρˡ))      (at θ = ref: log 2)

with the log-probs of the stored transitions under the current and the frozen reference model
(`d3po:scripts/rm/train_d3po.py`, β = 0.1, ε = 0.1). Logs `pair_fraction` (pairs with a winner) and
`implicit_acc`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Batch


def pareto_compare(a: Tensor, b: Tensor) -> Tensor:
    """+1 where a dominates b, −1 where b dominates a, 0 otherwise; a, b are (N,) or (N, D)."""
    if a.dim() == 1:
        a, b = a[:, None], b[:, None]
    a_wins = (a >= b).all(dim=1) & (a > b).any(dim=1)
    b_wins = (b >= a).all(dim=1) & (b > a).any(dim=1)
    return a_wins.long() - b_wins.long()


class D3PO(Algorithm):
    """Online per-step DPO on trajectory pairs that share their initial noise.

    Args:
        beta: β of the DPO loss.
        clip_eps: ε of the ratio clamp.
        pareto: compare the reward's per-sample terms by Pareto dominance (else the scalar reward).
        timestep_fraction: fraction of the steps trained per pair (a random subset per pair).
        train_batch_size: pairs per micro-batch (None: all).
        num_inner_epochs: passes over each batch of pairs.
        keep_undecided: keep incomparable/equal pairs with preference 0 (d3po's `compare` gives them
            (0, 0)) instead of dropping them; the loss then averages over all pairs.
    """

    needs_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        clip_eps: float = 0.1,
        pareto: bool = True,
        timestep_fraction: float = 1.0,
        train_batch_size: int | None = None,
        num_inner_epochs: int = 1,
        keep_undecided: bool = False,
    ) -> None:
        super().__init__()
        if beta <= 0 or not 0 < clip_eps < 1 or not 0 < timestep_fraction <= 1:
            raise ValueError("need beta > 0, 0 < clip_eps < 1 and 0 < timestep_fraction <= 1")
        self.beta, self.clip_eps, self.pareto = beta, clip_eps, pareto
        self.timestep_fraction, self.train_batch_size, self.num_inner_epochs = (
            timestep_fraction,
            train_batch_size,
            num_inner_epochs,
        )
        self.keep_undecided = keep_undecided

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        traj, metrics = collect_rollouts(ctx, batch, repeat=2, shared_noise=True)
        groups = traj.extras["group"]
        terms = traj.extras.get("reward_terms") or {}
        values = torch.stack(list(terms.values()), dim=1) if (self.pareto and terms) else traj.rewards
        first, second = [], []
        for g in groups.unique():
            rows = (groups == g).nonzero().flatten()
            if len(rows) == 2:  # a pair lost a member to an invalid reward: skip it
                first.append(int(rows[0]))
                second.append(int(rows[1]))
        n_groups = len(groups.unique())
        if not any(ctx.ranks.flags(bool(first))):  # every rank stops, or none does
            raise RuntimeError(
                "D3PO: no complete pair in this batch (every pair lost a sample to invalid rewards)"
            )
        a, b = torch.tensor(first, dtype=torch.long), torch.tensor(second, dtype=torch.long)
        h = pareto_compare(values[a.to(values.device)], values[b.to(values.device)]).cpu()
        decided = h != 0
        keep = torch.ones_like(decided) if self.keep_undecided else decided
        win = torch.where(h > 0, a, b)[keep]
        lose = torch.where(h > 0, b, a)[keep]
        metrics["pair_fraction"] = float(decided.sum()) / max(1, n_groups)
        dev = traj.states.device
        pref = decided[keep].float().to(dev)
        return Batch(winner=traj[win.to(dev)], loser=traj[lose.to(dev)], preference=pref), metrics

    def minibatches(self, data: Batch, generator: torch.Generator) -> Iterator[list[Batch]]:
        n, t = len(data.winner), data.winner.num_steps
        if n == 0:  # no decided pair in this batch: nothing to update on
            return
        k = max(1, int(t * self.timestep_fraction))
        bs = self.train_batch_size or n
        dev = data.winner.states.device
        for _ in range(self.num_inner_epochs):
            perm = torch.randperm(n, generator=generator).to(dev)
            steps = torch.stack([torch.randperm(t, generator=generator) for _ in range(n)]).to(dev)
            for s in range(0, n, bs):
                rows = perm[s : s + bs]
                w, l, h = data.winner[rows], data.loser[rows], data.preference[rows]
                yield [Batch(winner=w, loser=l, preference=h, step=steps[rows, j]) for j in range(k)]

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        lp_w = policy.log_prob(micro.winner, micro.step).log_prob
        lp_l = policy.log_prob(micro.loser, micro.step).log_prob
        with policy.backbone.reference() as ref:
            ref_w = policy.log_prob(micro.winner, micro.step, backbone=ref).log_prob
            ref_l = policy.log_prob(micro.loser, micro.step, backbone=ref).log_prob
        lo, hi = math.log(1 - self.clip_eps), math.log(1 + self.clip_eps)  # floats: any device
        log_rw = (lp_w - ref_w).clamp(lo, hi)
        log_rl = (lp_l - ref_l).clamp(lo, hi)
        inside = self.beta * micro.preference * (log_rw - log_rl)  # h = 0: an undecided pair (kept)
        decided = micro.preference > 0
        acc = (inside.detach()[decided] > 0).float().mean() if decided.any() else torch.tensor(float("nan"))
        return {"loss": -F.logsigmoid(inside).mean(), "implicit_acc": acc}
