"""Feynman–Kac (FK) steering: sequential Monte Carlo over particles with reward potentials.

Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion Models",
arXiv:2501.06848. Each condition gets `num_particles` particles sampled by the base sampler. At the
resampling steps the reward of each particle's one-step prediction, r_t = r(decode(x̂0(x_t))), gives
a potential G_t:

- DIFF: exp(λ(r_t − r_prev))     - MAX: exp(λ·max(r_t, max of past r))
- ADD:  exp(λ(r_t + Σ past r))   - RT:  exp(λ·r_t)

and particles are resampled multinomially in proportion to G_t within their condition's group — only
when the effective sample size 1/Σw̃² falls below `ess_threshold`·K (adaptive) or at every resampling
step. At the end MAX/ADD/RT divide by the product of the potentials already applied, so the target is
p_base(x)·exp(λ·r(x)); the output per condition is its best final particle (`final: best`) or a draw
by the final weights (`final: sample`). With λ = 0 every weight is equal and the base sampler's
distribution is unchanged. Potentials use x̂0 of the model output the sampler already computed: no
extra denoiser evaluations beyond the particles themselves.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.guidance.base import TestTimeMethod, group_argmax, pick, score
from diffalign.core.policy import DiffusionPolicy, RolloutHook, RolloutState
from diffalign.core.reward import Reward
from diffalign.core.sampling import per_row_multinomial, repeat_generators

Potential = Literal["diff", "max", "add", "rt"]


def effective_sample_size(weights: Tensor) -> Tensor:
    """1/Σw̃² per group, for weights of shape (groups, K)."""
    w = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return 1.0 / (w**2).sum(dim=1)


def multinomial_resample(weights: Tensor, generator: Any) -> Tensor:
    """Indices (groups, K) drawn with replacement ∝ weights within each group (uniform if all zero);
    with one generator per group, group g draws from generator g."""
    w = weights.clamp_min(0)
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, torch.ones_like(w))
    return per_row_multinomial(w, w.shape[1], generator, replacement=True).to(weights.device)


class FKSteeringHook(RolloutHook):
    """The per-step part of FK steering over B groups of K particles (rows group-major)."""

    def __init__(
        self,
        reward: Reward,
        num_particles: int,
        lam: float,
        potential: Potential,
        resample_steps: set[int],
        ess_threshold: float | None,
        generator: Any,
    ) -> None:
        self.reward, self.k, self.lam, self.potential = reward, num_particles, lam, potential
        self.resample_steps, self.ess_threshold, self.generator = resample_steps, ess_threshold, generator
        self.r_prev: Tensor | None = None  # last r per particle (DIFF), running max (MAX), running sum (ADD)
        self.log_applied: Tensor | None = None  # log of the product of potentials along each particle's path
        self.log_w: Tensor | None = None  # log-weights accumulated since the particle's group last resampled
        self.resampled = 0

    def _log_potential(self, r: Tensor) -> Tensor:
        prev = self.r_prev if self.r_prev is not None else torch.zeros_like(r)
        if self.potential == "diff":
            return self.lam * (r - prev)
        if self.potential == "max":
            return self.lam * torch.maximum(r, prev) if self.r_prev is not None else self.lam * r
        if self.potential == "add":
            return self.lam * (r + prev)
        return self.lam * r

    def _update_prev(self, r: Tensor) -> None:
        if self.potential == "max":
            self.r_prev = r if self.r_prev is None else torch.maximum(self.r_prev, r)
        elif self.potential == "add":
            self.r_prev = r if self.r_prev is None else self.r_prev + r
        else:
            self.r_prev = r

    def after_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:
        if state.index not in self.resample_steps or state.index == policy.num_steps - 1:
            return  # the final step is weighted after the rollout, on the final samples
        r = score(self.reward, policy, state.step.pred_x0, state.mask, state.cond)
        log_g = torch.nan_to_num(self._log_potential(r), nan=float("-inf"))
        self._update_prev(r)
        self.log_applied = log_g if self.log_applied is None else self.log_applied + log_g
        self.log_w = log_g if self.log_w is None else self.log_w + log_g
        groups = self.log_w.reshape(-1, self.k)
        w = torch.exp(groups - groups.max(dim=1, keepdim=True).values).clamp(0, 1e10)
        do = torch.ones(groups.shape[0], dtype=torch.bool, device=w.device)
        if self.ess_threshold is not None:
            do = effective_sample_size(w) < self.ess_threshold * self.k
        if not do.any():
            return  # weights carry over to the next resampling step
        # only the groups that resample draw (from their own generator): a group's draws never depend on
        # the other groups of the batch
        idx = torch.arange(self.k, device=w.device).expand_as(w).clone()
        todo = do.nonzero().flatten()
        gens = self.generator
        if isinstance(gens, (list, tuple)):
            gens = [gens[int(g)] for g in todo]
        idx[todo] = multinomial_resample(w[todo], gens)
        rows = (idx + torch.arange(groups.shape[0], device=w.device)[:, None] * self.k).reshape(-1)
        self.resampled += int(do.sum())
        state.prev_sample = state.prev_sample[rows]
        state.cond = state.cond[rows]
        state.mask = pick(state.mask, rows)
        self.r_prev = self.r_prev[rows]
        self.log_applied = self.log_applied[rows]
        # resampled groups start again from equal weights; the others keep theirs
        reset = do.repeat_interleave(self.k)
        self.log_w = torch.where(reset, torch.zeros_like(self.log_w), self.log_w[rows])

    def final_log_weights(self, r: Tensor) -> Tensor:
        """Log-weights of the final particles given their final rewards: the weights carried since the last
        resample times the last potential, which completes each path's product to exp(λ·r_final)."""
        if self.potential == "diff":
            last = self.lam * (r - (self.r_prev if self.r_prev is not None else torch.zeros_like(r)))
        else:  # MAX/ADD/RT: divide by the potentials already applied along the path
            last = self.lam * r - (self.log_applied if self.log_applied is not None else torch.zeros_like(r))
        return last + (self.log_w if self.log_w is not None else torch.zeros_like(r))


class FKSteering(TestTimeMethod):
    """SMC / Feynman–Kac steering with reward potentials.

    Args:
        num_particles: K particles per condition (cost ≈ K plain samples).
        lam: λ, the strength of the tilt exp(λ·r); 0 leaves the base distribution unchanged.
        potential: "diff", "max", "add" or "rt".
        resample_every: resample every this many steps inside the window.
        start_fraction, end_fraction: the resampling window as fractions of the steps.
        ess_threshold: resample a group only when its ESS < threshold·K (None: always).
        final: "best" particle per condition, or "sample" one by the final weights.
    """

    def __init__(
        self,
        num_particles: int = 4,
        lam: float = 10.0,
        potential: Potential = "diff",
        resample_every: int = 1,
        start_fraction: float = 0.0,
        end_fraction: float = 1.0,
        ess_threshold: float | None = 0.5,
        final: Literal["best", "sample"] = "best",
    ) -> None:
        if num_particles < 1 or resample_every < 1:
            raise ValueError("num_particles and resample_every must be >= 1")
        if potential not in ("diff", "max", "add", "rt"):
            raise ValueError(f"potential must be diff, max, add or rt, got {potential!r}")
        self.num_particles, self.lam, self.potential = num_particles, lam, potential
        self.resample_every, self.start_fraction, self.end_fraction = (
            resample_every,
            start_fraction,
            end_fraction,
        )
        self.ess_threshold, self.final = ess_threshold, final

    def resample_steps(self, num_steps: int) -> set[int]:
        lo = int(self.start_fraction * num_steps)
        hi = max(lo + 1, int(round(self.end_fraction * num_steps)))
        return set(range(lo, min(hi, num_steps), self.resample_every))

    @torch.no_grad()
    def sample(self, policy, cond, reward, generator):
        k = self.num_particles
        cond_k = cond.repeat_interleave(k)
        hook = FKSteeringHook(
            reward,
            k,
            self.lam,
            self.potential,
            self.resample_steps(policy.num_steps),
            self.ess_threshold,
            generator,
        )
        traj = policy.rollout(cond_k, repeat_generators(generator, k), hooks=[hook])
        r = score(reward, policy, traj.x0, traj.mask, traj.cond)
        if self.final == "best":
            idx = group_argmax(r, k)
        else:
            groups = hook.final_log_weights(r).reshape(-1, k)
            w = torch.exp(groups - groups.max(dim=1, keepdim=True).values)
            pick_idx = multinomial_resample(w, generator)[:, 0]
            idx = torch.arange(groups.shape[0], device=w.device) * k + pick_idx
        return traj.x0[idx], pick(traj.mask, idx), {"resampled_groups": hook.resampled}
