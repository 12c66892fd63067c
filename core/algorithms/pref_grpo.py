"""Pref-GRPO: GRPO on within-group pairwise win rates of a preference judge.

Wang et al., "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement
Learning", arXiv:2508.20751 (CodeGoat24/Pref-GRPO, `_pairwise_win_rate`). A pointwise reward's small
score differences inside a group are blown up by the group's std ("illusory advantage"), which the
policy then exploits. Pref-GRPO asks a judge about every pair (i, j) of a group and rewards each sample
with its win rate

    w_i = Σ_{j≠i} P(i ≻ j) / (G − 1)        (a tie or no verdict counts ½ to each)

then runs GRPO's group normalisation and update on w. With a `judge` (`core.judges.PairwiseJudge`) each
group costs G(G−1)/2 judge calls; without one, the module's reward is compared pairwise with hard
verdicts, which makes the advantage a function of the ranks inside the group only (no extra queries).
The module's reward is still what `reward_mean` logs and evaluation measures.

Logs `win_rate_spread` (mean within-group std of the win rates) and, with a judge, `judge_pairs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from diffalign.core.advantages import pairwise_win_rates
from diffalign.core.algorithms.grpo import GRPO
from diffalign.core.judges import PairwiseJudge
from diffalign.core.reward import SampleView
from diffalign.core.rollouts import AlignContext
from diffalign.core.types import Trajectory


class PrefGRPO(GRPO):
    """GRPO whose reward is the within-group win rate; see `GRPO` for the shared arguments.

    Args:
        judge: the pairwise judge (None: compare the module's reward pairwise, hard verdicts).
    """

    def __init__(
        self,
        judge: PairwiseJudge | None = None,
        group_size: int = 8,
        shared_noise: bool = False,
        std_scope: Literal["group", "global"] = "group",
        kl_coef: float = 0.0,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
        sde_window_size: int | None = None,
        sde_window_schedule: Literal["progressive", "random"] = "progressive",
        sde_window_shift_every: int = 25,
        sde_window_stride: int | None = None,
        sde_window_roll_back: bool = False,
    ) -> None:
        super().__init__(
            group_size=group_size,
            shared_noise=shared_noise,
            std_scope=std_scope,
            kl_coef=kl_coef,
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
            train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            sde_window_size=sde_window_size,
            sde_window_schedule=sde_window_schedule,
            sde_window_shift_every=sde_window_shift_every,
            sde_window_stride=sde_window_stride,
            sde_window_roll_back=sde_window_roll_back,
        )
        self._judge = [judge.freeze()] if judge is not None else []  # a list keeps it out of checkpoints

    @property
    def judge(self) -> PairwiseJudge | None:
        return self._judge[0] if self._judge else None

    @torch.no_grad()
    def win_rates(self, ctx: AlignContext, traj: Trajectory) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) win rate of each row within its group, and metrics."""
        groups = traj.extras["group"].cpu()
        members = [(groups == g).nonzero().flatten() for g in groups.unique()]
        prefs = {i: torch.full((len(m), len(m)), 0.5) for i, m in enumerate(members)}
        pairs = [
            (i, a, b) for i, m in enumerate(members) for a in range(len(m)) for b in range(a + 1, len(m))
        ]
        metrics: dict[str, float] = {}
        if pairs and self.judge is not None:
            first = torch.tensor([int(members[i][a]) for i, a, _ in pairs]).to(traj.states.device)
            second = torch.tensor([int(members[i][b]) for i, _, b in pairs]).to(traj.states.device)
            backbone, x0, mask = ctx.policy.backbone, traj.x0, traj.mask
            self.judge.to(ctx.device)
            p = (
                self.judge(
                    SampleView(backbone, x0[first], None if mask is None else mask[first]),
                    SampleView(backbone, x0[second], None if mask is None else mask[second]),
                    traj.cond[first],
                )
                .float()
                .cpu()
            )
            metrics["judge_pairs"] = float(len(pairs))
        elif pairs:
            r = traj.rewards.cpu()
            ra = torch.tensor([float(r[members[i][a]]) for i, a, _ in pairs])
            rb = torch.tensor([float(r[members[i][b]]) for i, _, b in pairs])
            p = (ra > rb).float() + 0.5 * (ra == rb).float()
        for (i, a, b), pab in zip(pairs, p.tolist() if pairs else [], strict=True):
            prefs[i][a, b], prefs[i][b, a] = pab, 1.0 - pab
        win = torch.full((len(groups),), 0.5)
        spread = []
        for i, m in enumerate(members):
            if len(m) >= 2:
                w = pairwise_win_rates(prefs[i])
                win[m] = w
                spread.append(float(w.std(unbiased=False)))
        metrics["win_rate_spread"] = sum(spread) / max(1, len(spread))
        return win.to(traj.states.device), metrics

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Trajectory, dict[str, float]]:
        traj, metrics = self.rollouts(ctx, batch)
        win, win_metrics = self.win_rates(ctx, traj)
        traj.advantages, adv_metrics = self.group_advantages(ctx, traj, win)
        metrics.update(win_metrics)
        metrics.update(adv_metrics)
        return traj, metrics
