"""GRPO for diffusion: group-relative advantages over several samples of the same condition.

Flow-GRPO (Liu et al., arXiv:2505.05470) and DanceGRPO (Xue et al., arXiv:2505.07818). Each condition
of the batch is sampled `group_size` times (optionally from one shared x_T, DanceGRPO's choice); a
sample's advantage is its reward minus its group's mean, divided by the group's std (or the whole
batch's std with `std_scope: global`). The update is DDPO's clipped ratio, optionally with the
closed-form per-step KL to the reference (Flow-GRPO's β = 0.04). With `FlowSDEKernel` (or
`DanceSDEKernel`, `CPSKernel`) on a flow-matching backbone this is Flow-GRPO / DanceGRPO; with
`DDIMKernel` on an ε backbone it is GRPO on a DDPM-family model.

Options of the 2025 follow-ups:

- **SDE window** (MixGRPO, arXiv:2507.21802; Flow-GRPO-Fast): with `sde_window_size` = w only w
  consecutive steps are stochastic; the others take the kernel's ODE step. Only the window is stored
  (its states, timesteps and log-probs; the final sample beside them) and only its steps are trained,
  so an update costs w/T of the full one. The window moves as `core.policy_gradient.SDEWindow` says
  (`sde_window_schedule`: progressive or random).
- **Per-reward advantages** (GDPO, arXiv:2601.05242; DanceGRPO's VQ/MQ): with a `WeightedSum` reward
  and `advantage_aggregation: per_reward`, each term is normalised within its group before the weighted
  sum (`core.advantages.per_reward_advantages`), instead of normalising the sum.

Logs `zero_std_ratio`, the fraction of groups whose rewards are all equal (they carry no signal), and
`sde_window_start` with a window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from diffalign.core.advantages import trajectory_advantages
from diffalign.core.algorithms.ddpo import DDPO
from diffalign.core.policy_gradient import SDEWindow
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Trajectory


class GRPO(DDPO):
    """Group-relative policy optimisation; see `DDPO` for the shared arguments.

    Args:
        group_size: samples per condition (the rollout batch is batch_size × group_size).
        shared_noise: start a group's samples from the same initial noise (DanceGRPO).
        std_scope: normalise by each group's std ("group") or the batch's ("global"); with
            `advantage_aggregation: per_reward`, each term's.
        kl_coef: β of the per-step KL to the reference (0 disables it and the reference copy).
        advantage_aggregation: "sum" (normalise the reward) or "per_reward" (GDPO: normalise each term
            of a `WeightedSum` reward within its group, weight, sum, then normalise over the batch).
        sde_window_size: stochastic steps per rollout (None: all; see the module docstring).
        sde_window_schedule: "progressive" or "random" (see `SDEWindow`).
        sde_window_shift_every: batches per window position (progressive).
        sde_window_stride: steps the window moves (default its size).
        sde_window_roll_back: start over at step 0 after the last position (progressive).
    """

    #: keep the behaviour policy's step means in the trajectory (GRPO-Guard needs them)
    records_means = False

    def __init__(
        self,
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
        advantage_aggregation: Literal["sum", "per_reward"] = "sum",
        sde_window_size: int | None = None,
        sde_window_schedule: Literal["progressive", "random"] = "progressive",
        sde_window_shift_every: int = 25,
        sde_window_stride: int | None = None,
        sde_window_roll_back: bool = False,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
        if std_scope not in ("group", "global"):
            raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
        if advantage_aggregation not in ("sum", "per_reward"):
            raise ValueError(
                f"advantage_aggregation must be 'sum' or 'per_reward', got {advantage_aggregation!r}"
            )
        super().__init__(
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            advantages="batch",
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
            train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            kl_coef=kl_coef,
        )
        self.group_size = group_size
        self.shared_noise = shared_noise
        self.std_scope = std_scope
        self.advantage_aggregation = advantage_aggregation
        self.sde_window = (
            SDEWindow(
                sde_window_size,
                sde_window_schedule,
                sde_window_shift_every,
                sde_window_stride,
                sde_window_roll_back,
            )
            if sde_window_size is not None
            else None
        )

    def algorithm_state(self) -> dict[str, Any]:
        state = super().algorithm_state()
        if self.sde_window is not None:
            state["sde_window"] = self.sde_window.state_dict()
        return state

    def load_algorithm_state(self, state: dict[str, Any]) -> None:
        super().load_algorithm_state(state)
        if self.sde_window is not None:
            self.sde_window.load_state_dict(state.get("sde_window", {}))

    def rollouts(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Trajectory, dict[str, float]]:
        """The group rollouts of a batch (the window's steps only, with a window)."""
        steps = ctx.policy.rollout_steps or ctx.policy.num_steps
        window = self.sde_window.window(steps, ctx.generator) if self.sde_window else None
        traj, metrics = collect_rollouts(
            ctx, batch, self.group_size, self.shared_noise, sde_window=window, record_means=self.records_means
        )
        if window is not None:
            metrics["sde_window_start"] = float(window[0])
            self.sde_window.advance()
        return traj, metrics

    def group_advantages(
        self, ctx: AlignContext, traj: Trajectory, rewards: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped advantages (B,) of the rows of `traj` given their `rewards`, and metrics."""
        adv, metrics = trajectory_advantages(
            traj, ctx.reward, self.advantage_aggregation, self.std_scope, ctx.ranks, rewards
        )
        return adv.clamp(-self.adv_clip_max, self.adv_clip_max).to(traj.states.device), metrics

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Trajectory, dict[str, float]]:
        traj, metrics = self.rollouts(ctx, batch)
        traj.advantages, adv_metrics = self.group_advantages(ctx, traj, traj.rewards)
        metrics.update(adv_metrics)
        return traj, metrics
