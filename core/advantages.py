"""Advantages from rewards: batch normalisation, per-prompt running statistics, group-relative.

The shared statistics of the policy-gradient family (DDPO, DPOK, GRPO): each function maps a batch of
rewards (and the condition key or group of each row) to advantages, and does nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.distributed import Ranks, RowShard
from diffalign.core.types import Cond


def row_keys(cond: Cond) -> list[str]:
    """A hashable key per row: its prompt (`cond["prompt"]`; dicts as sorted JSON) when the rows have
    one, else a hash of the row's tensors (for grouping samples by condition)."""
    prompts = cond.prompts
    if prompts is not None:
        return [
            json.dumps(p, sort_keys=True, default=str) if isinstance(p, dict) else str(p) for p in prompts
        ]
    n = len(cond)
    keys: list[list[str]] = [[] for _ in range(n)]
    for name in sorted(cond):
        v = cond[name]
        if isinstance(v, Tensor):
            flat = v.detach().reshape(n, -1).float().cpu()
            for i in range(n):
                keys[i].append(f"{name}={flat[i].numpy().tobytes().hex()}")
    return ["|".join(k) for k in keys]


@dataclass
class GlobalRewards:
    """The rewards of the global batch (every rank's rows, in rank order), what statistics over it need,
    and where this rank's rows are (`shard.take(values)` keeps them)."""

    rewards: Tensor
    keys: list[str]
    groups: Tensor
    shard: RowShard


def gather_rewards(ranks: Ranks, rewards: Tensor, keys: Sequence[str], groups: Tensor) -> GlobalRewards:
    """Gather rewards, prompt keys and group ids from every rank (a collective with several ranks).

    Group ids are made unique across ranks (a group never spans ranks: each rank samples whole groups),
    so group statistics over the gathered batch equal the per-rank ones.
    """
    shard = ranks.rows(len(rewards))
    every_groups = groups.detach().cpu().long()
    if ranks.distributed:
        width = int(max(ranks.gather_objects(int(every_groups.max()) + 1 if len(every_groups) else 0)))
        every_groups = ranks.gather(every_groups + ranks.rank * width)
    return GlobalRewards(ranks.gather(rewards), ranks.gather_lists(list(keys)), every_groups, shard)


def batch_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """(R − mean) / (std + eps) over the batch."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def group_advantages(
    rewards: Tensor,
    groups: Tensor,
    std_scope: Literal["group", "global"] = "group",
    eps: float = 1e-4,
) -> tuple[Tensor, float]:
    """(r − mean_group) / (std + eps) (GRPO); returns the advantages and the fraction of groups whose
    rewards are all equal (they get advantage 0: no preference inside the group)."""
    adv = torch.zeros_like(rewards)
    zero = 0
    ids = groups.unique()
    global_std = rewards.std(unbiased=False)
    for g in ids:
        rows = groups == g
        r = rewards[rows]
        std = r.std(unbiased=False) if std_scope == "group" else global_std
        if r.numel() < 2 or float(r.max() - r.min()) == 0.0:
            zero += 1
            continue
        adv[rows] = (r - r.mean()) / (std + eps)
    return adv, zero / max(1, len(ids))


class PerPromptNormalizer:
    """Per-condition reward normalisation with a running buffer per key (DDPO's stat tracker).

    A key's advantage is (R − μ_key)/(σ_key + eps) over the last `buffer_size` rewards seen for that key;
    while a key has fewer than `min_count` rewards, the statistics of the whole batch are used instead.
    Its state is plain data so it can go into a checkpoint.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, list[float]] = {}

    def __call__(self, keys: Sequence[str], rewards: Tensor) -> Tensor:
        r = rewards.detach().float().cpu()
        adv = torch.empty_like(r)
        keys = [str(k) for k in keys]
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            buf = self.buffers.setdefault(key, [])
            buf.extend(r[rows].tolist())
            del buf[: max(0, len(buf) - self.buffer_size)]
            ref = torch.tensor(buf) if len(buf) >= self.min_count else r
            mean, std = ref.mean(), ref.std(unbiased=False)
            adv[rows] = (r[rows] - mean) / (std + self.eps)
        return adv.to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: list(v) for k, v in state.get("buffers", {}).items()}


def per_reward_advantages(
    terms: dict[str, Tensor],
    weights: dict[str, float],
    groups: Tensor,
    eps: float = 1e-6,
    std_scope: Literal["group", "global"] = "group",
) -> tuple[Tensor, dict[str, float]]:
    """GDPO (arXiv 2601.05242; DanceGRPO's VQ/MQ; Flow-Factory's `advantage_aggregation: gdpo`): normalise
    each reward term within its group, weight and sum, then normalise the sum over the batch:

        A = z(Σ_k w_k · (r_k − mean_g r_k) / max(std_g r_k, eps)),   z(a) = (a − mean a) / (std a + eps)

    so a term with a large spread cannot drown the others, as it does when the weighted sum is
    normalised as one reward. With `std_scope: global` each term is divided by its std over the batch
    instead of the group's (Flow-GRPO's global std, term by term): a term nearly constant within every
    group then stays small rather than being blown up to full weight. Groups whose term is constant
    contribute 0 for that term. Returns the
    advantages and, per term, the fraction of groups where it was constant (`zero_std_ratio/<term>`).
    """
    missing = sorted(set(weights) - set(terms))
    if missing:
        raise ValueError(f"per-reward advantages: the rollouts report no scores for terms {missing}")
    total = torch.zeros_like(next(iter(terms.values())), dtype=torch.float32)
    flat: dict[str, float] = {}
    ids = groups.unique()
    for name, w in weights.items():
        r = terms[name].float().to(total.device)
        batch_std = r.std(unbiased=False)
        norm = torch.zeros_like(r)
        constant = 0
        for g in ids:
            rows = (groups == g).to(r.device)
            rg = r[rows]
            if rg.numel() < 2 or float(rg.max() - rg.min()) == 0.0:
                constant += 1
                continue
            std = rg.std(unbiased=False) if std_scope == "group" else batch_std
            norm[rows] = (rg - rg.mean()) / std.clamp_min(eps)
        total = total + w * norm
        flat[f"zero_std_ratio/{name}"] = constant / max(1, len(ids))
    return (total - total.mean()) / (total.std(unbiased=False) + eps), flat


def pairwise_win_rates(preferences: Tensor) -> Tensor:
    """Pref-GRPO's reward: each sample's mean win over the other members of its group.

    `preferences` (G, G): entry (i, j) is the probability (or 0/1/½ decision) that sample i beats j, for
    i ≠ j (the diagonal is ignored). Returns (G,) win rates Σ_{j≠i} P(i ≻ j) / (G − 1) in [0, 1].
    """
    g = preferences.shape[0]
    if preferences.shape != (g, g) or g < 2:
        raise ValueError(f"preferences must be (G, G) with G >= 2, got {tuple(preferences.shape)}")
    off = ~torch.eye(g, dtype=torch.bool, device=preferences.device)
    return (preferences.float() * off).sum(1) / (g - 1)


def rollout_advantages(
    rewards: Tensor,
    groups: Tensor,
    terms: dict[str, Tensor] | None = None,
    weights: dict[str, float] | None = None,
    std_scope: Literal["group", "global"] = "group",
    ranks: Ranks | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group-relative advantages of a batch of rollouts: GRPO's (`group_advantages` of `rewards`), or — when
    per-term `weights` are given — GDPO's per-reward normalisation of the `terms` (`per_reward_advantages`).
    Metrics: `zero_std_ratio` (and per term with GDPO).

    With several `ranks` (a collective: every rank calls it) rewards, groups and terms are gathered
    first, so the global std, GDPO's batch normalisation and the ratios are over the global batch (a
    group never spans ranks); each rank gets back its own rows' advantages.
    """
    shard = None
    if ranks is not None and ranks.distributed:
        every = gather_rewards(ranks, rewards, [""] * len(rewards), groups)
        rewards, groups, shard = every.rewards, every.groups, every.shard
        terms = {k: ranks.gather(v) for k, v in sorted((terms or {}).items())} if weights else terms
    adv, zero = group_advantages(rewards.cpu(), groups.cpu(), std_scope)
    if weights is None:
        metrics = {"zero_std_ratio": zero}
    else:
        adv, metrics = per_reward_advantages(
            {k: v.cpu() for k, v in (terms or {}).items()}, weights, groups.cpu(), std_scope=std_scope
        )
        metrics["zero_std_ratio"] = zero
    return (adv if shard is None else shard.take(adv)), metrics


def trajectory_advantages(
    traj: Any,
    reward: Any,
    aggregation: Literal["sum", "per_reward"],
    std_scope: Literal["group", "global"],
    ranks: Ranks | None = None,
    rewards: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`rollout_advantages` of a group-rollout trajectory (its `group` and `reward_terms` extras), scored
    by `rewards` (default `traj.rewards`): per-reward (GDPO) weights from `reward` with `aggregation:
    per_reward`, the plain group advantages otherwise. GRPO, DiffusionNFT and AWM share it."""
    weights = term_weights(reward) if aggregation == "per_reward" else None
    return rollout_advantages(
        traj.rewards if rewards is None else rewards,
        traj.extras["group"],
        traj.extras.get("reward_terms"),
        weights,
        std_scope,
        ranks,
    )


def term_weights(reward: Any) -> dict[str, float]:
    """{term name: weight} of a `WeightedSum` reward, unwrapping a `GuardedReward` (what per-reward
    advantages weight); a clear error for any other reward."""
    from diffalign.core.reward import GuardedReward, WeightedSum

    reward = reward.reward if isinstance(reward, GuardedReward) else reward
    if not isinstance(reward, WeightedSum):
        raise ValueError(
            "per-reward advantages (advantage_aggregation: per_reward) need a WeightedSum reward, whose "
            f"terms they normalise one by one; got {type(reward).__name__}"
        )
    return dict(zip(reward.term_names(), reward.weights, strict=True))
