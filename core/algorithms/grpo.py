"""GRPO for diffusion: group-relative advantages over several samples of the same condition.

Flow-GRPO (Liu et al., arXiv:2505.05470) and DanceGRPO (Xue et al., arXiv:2505.07818). Each condition
of the batch is sampled `group_size` times (optionally from one shared x_T); a sample's advantage is
its reward minus its group's mean, divided by the group's std (or the whole batch's std with
`std_scope: global`). The update is DDPO's clipped ratio, optionally with the closed-form per-step KL
to the reference (Flow-GRPO's β = 0.04). With `FlowSDEKernel` on a flow-matching backbone this is
Flow-GRPO; with `DDIMKernel` on an ε backbone it is GRPO on a DDPM-family model.

Logs `zero_std_ratio`, the fraction of groups whose rewards are all equal (they carry no signal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from diffalign.core.advantages import gather_rewards, group_advantages
from diffalign.core.algorithms.ddpo import DDPO
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.types import Trajectory


class GRPO(DDPO):
    """Group-relative policy optimisation; see `DDPO` for the shared arguments.

    Args:
        group_size: samples per condition (the rollout batch is batch_size × group_size).
        shared_noise: start a group's samples from the same initial noise.
        std_scope: normalise by each group's std ("group") or the batch's ("global").
        kl_coef: β of the per-step KL to the reference (0 disables it and the reference copy).
    """

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
    ) -> None:
        if group_size < 2:
            raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
        if std_scope not in ("group", "global"):
            raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
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

    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Trajectory, dict[str, float]]:
        traj, metrics = collect_rollouts(ctx, batch, self.group_size, self.shared_noise)
        # a group never spans processes (each rank samples whole groups); the global std and the
        # zero-std ratio are over every rank's groups
        every = gather_rewards(ctx.ranks, traj.rewards, traj.extras["key"], traj.extras["group"])
        adv, zero_ratio = group_advantages(every.rewards.cpu(), every.groups, self.std_scope)
        adv = every.shard.take(adv)
        traj.advantages = adv.clamp(-self.adv_clip_max, self.adv_clip_max).to(traj.states.device)
        metrics["zero_std_ratio"] = zero_ratio
        return traj, metrics
