"""Transition kernels: the per-step math of a sampler, with the log-prob of each step.

A kernel wraps a diffusers scheduler (the noise schedule) and turns one denoiser output into a Gaussian
transition x_t -> x_{t'}: its mean, its std, a sample from it and the sample's log-probability. Passing a
stored `prev_sample` re-scores that transition under the current model output, which is what every
policy-gradient method needs. All math runs in float32 and broadcasts over any event rank.

The log-prob is reduced over the event dims by `reduction`: "mean" (what DDPO and Flow-GRPO do: the
importance ratio is then a per-dimension geometric mean, so a clip range of 1e-4 is a per-dimension
bound) or "sum" (the true joint log-density: ratios are far larger and the clip range must grow with
the number of dimensions).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.distributed import RowShard
from diffalign.core.functional import Generator, expand_mask, gaussian_log_prob, left_broadcast, masked_noise

Reduction = Literal["mean", "sum"]


@dataclass
class StepOutput:
    """Result of one transition: the next state, its log-prob (B,), the Gaussian mean and std, and x̂0."""

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    pred_x0: Tensor


def _timestep_tensor(t: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.dim() == 0 else t


class TransitionKernel(ABC):
    """Base class: binds to a backbone's scheduler, sets the sampling timesteps, steps and re-scores.

    Args:
        reduction: how the per-entry Gaussian log-density is reduced over event dims ("mean" or "sum").
    """

    scheduler_class: Any = None

    def __init__(self, reduction: Reduction = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.scheduler: Any = None
        self.num_steps: int | None = None
        self._tables: dict[tuple[str, str], Tensor] = {}

    # -- binding -------------------------------------------------------------------------------------
    def bind(self, scheduler: Any) -> TransitionKernel:
        """Build this kernel's own scheduler from the backbone's scheduler config."""
        self._check_compatible(scheduler)
        self.scheduler = self.scheduler_class.from_config(scheduler.config)
        self._tables = {}
        return self

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A float32 table of the scheduler (`alphas_cumprod`, ...) on `device`, copied there once: the
        sampling loop then makes no CPU → GPU copy per step."""
        key = (name, str(device))
        if key not in self._tables:
            value = torch.as_tensor(getattr(self.scheduler, name), dtype=torch.float32)
            self._tables[key] = value.to(device)
        return self._tables[key]

    def _check_compatible(self, scheduler: Any) -> None:  # noqa: B027 - optional hook
        """Raise ValueError if `scheduler` cannot drive this kernel (subclasses check)."""

    def _require_bound(self) -> None:
        if self.scheduler is None or self.num_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call bind(scheduler) and set_timesteps(n) first")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> Tensor:
        """Set the number of sampling steps; returns the timesteps x_T … in sampling order, shape (T,)."""
        self.scheduler.set_timesteps(num_steps, device=device)
        self.num_steps = num_steps
        return self.scheduler.timesteps

    # -- per step ------------------------------------------------------------------------------------
    @abstractmethod
    def pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """The model's estimate of the clean sample at timestep `t`."""

    @abstractmethod
    def shift_pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor, delta: Tensor) -> Tensor:
        """A model output whose x̂0 is the current x̂0 + `delta` (how guidance edits a prediction)."""

    @abstractmethod
    def mean_std(self, model_output: Tensor, t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gaussian mean and std of the transition (float32, std broadcastable), and x̂0."""

    def ode_mean_std(self, model_output: Tensor, t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The deterministic (probability-flow ODE) counterpart of the step: its mean, std 0, and x̂0 — what
        a step outside an SDE window takes (`DiffusionPolicy.rollout(sde_window=...)`)."""
        raise NotImplementedError(f"{type(self).__name__} has no deterministic (ODE) step")

    def step(
        self,
        model_output: Tensor,
        t: Tensor | float | int,
        x_t: Tensor,
        prev_sample: Tensor | None = None,
        generator: Generator = None,
        mask: Tensor | None = None,
        noise: Tensor | None = None,
        deterministic: bool = False,
    ) -> StepOutput:
        """Sample (or, given `prev_sample`, re-score) the transition from `x_t` at timestep(s) `t`.

        `noise` (standard normal, shaped like x_t) replaces the generator's draw; the sample
        mean + std·noise then keeps the graph of both (direct noise optimisation differentiates through
        it). Padded entries (mask == 0) never change: they keep their value in x_t, get no noise and do
        not count in the log-prob. `deterministic` takes the ODE step instead (`ode_mean_std`: std 0,
        log-prob 0); it still draws (and discards) the step's noise, so the steps after it see the same
        random stream as without it.
        """
        self._require_bound()
        x = x_t.float()
        tt = _timestep_tensor(t, x.shape[0], x.device)
        mean_std = self.ode_mean_std if deterministic else self.mean_std
        mean, std, x0 = mean_std(model_output.float(), tt, x)
        std_full = std.expand_as(mean)
        if prev_sample is None:
            if noise is None:
                noise = masked_noise(mean.shape, generator, mask, device=mean.device)
            prev_sample = mean + std_full * noise.float()
            m = expand_mask(mask, mean)
            if m is not None:
                prev_sample = torch.where(m > 0, prev_sample, x)
        log_prob = gaussian_log_prob(prev_sample.float(), mean, std_full, mask, self.reduction)
        return StepOutput(
            prev_sample=prev_sample.float(), log_prob=log_prob, mean=mean, std=std_full, pred_x0=x0
        )

    # -- training on data ----------------------------------------------------------------------------
    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The forward process: x_t for clean `x0`, standard-normal `noise` and timestep(s) `t`."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """What the model should output for x_t = add_noise(x0, noise, t) (ε, v, x0 or ε − x0)."""

    @abstractmethod
    def draw_timesteps(self, batch: int, generator: Generator = None, device=None) -> Tensor:
        """Training timesteps (B,) drawn uniformly over the schedule (ints, or σ·N for flow matching)."""

    def training_sample(
        self,
        x0: Tensor,
        generator: Generator = None,
        mask: Tensor | None = None,
        rows: RowShard | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw a noisy training input: returns (x_t, t, target) for the denoising loss.

        One timestep per row, then masked standard-normal noise (padded entries get none). With `rows`
        (this rank's rows of a global batch, `AlignContext.rows`), both are drawn for the global batch
        and this rank keeps its rows, so the draws do not depend on the number of processes.
        """
        x0 = x0.float()
        rows = rows if rows is not None else RowShard(0, x0.shape[0], x0.shape[0])
        t = rows.draw(lambda n: self.draw_timesteps(n, generator, x0.device))
        noise = rows.noise(x0.shape, generator, mask, device=x0.device)
        return self.add_noise(x0, noise, t), t, self.target(x0, noise, t)


class _AlphaKernel(TransitionKernel):
    """Shared math for schedulers defined by cumulative alphas (DDIM, DDPM)."""

    def _check_compatible(self, scheduler: Any) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{type(self).__name__} needs a scheduler with alphas_cumprod (DDPM/DDIM family), got "
                f"{type(scheduler).__name__}; flow-matching backbones use FlowSDEKernel"
            )
        pt = scheduler.config.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"{type(self).__name__} does not support prediction_type {pt!r}")
        if scheduler.config.get("thresholding", False):
            raise ValueError(f"{type(self).__name__} does not support dynamic thresholding")

    def _alpha(self, t: Tensor) -> Tensor:
        ac = self._table("alphas_cumprod", t.device)
        return ac[t.long().clamp(0, len(ac) - 1)]

    def _x0_eps(self, model_output: Tensor, alpha: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        a = left_broadcast(alpha, x.shape)
        sa, sb = a.sqrt(), (1 - a).sqrt()
        pt = self.prediction_type
        if pt == "epsilon":
            x0, eps = (x - sb * model_output) / sa, model_output
        elif pt == "sample":
            x0 = model_output
            eps = (x - sa * x0) / sb
        else:  # v_prediction
            x0 = sa * x - sb * model_output
            eps = sa * model_output + sb * x
        cfg = self.scheduler.config
        if cfg.get("clip_sample", False):
            # like diffusers (use_clipped_model_output=False): only x̂0 is clipped, ε̂ stays unclipped
            r = cfg.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        return x0, eps

    def pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        x = x_t.float()
        tt = _timestep_tensor(t, x.shape[0], x.device)
        return self._x0_eps(model_output.float(), self._alpha(tt), x)[0]

    def _alpha_prev(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def ode_mean_std(self, model_output: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The DDIM (eta = 0) step to this kernel's previous timestep: √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂."""
        a_t, a_prev = self._alpha(t), self._alpha_prev(t)
        x0, eps = self._x0_eps(model_output, a_t, x)
        ap = left_broadcast(a_prev, x.shape)
        mean = ap.sqrt() * x0 + (1 - ap).clamp_min(0).sqrt() * eps
        return mean, torch.zeros_like(ap), x0

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        tt = _timestep_tensor(t, x0.shape[0], x0.device)
        a = left_broadcast(self._alpha(tt), x0.shape)
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    def shift_pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor, delta: Tensor) -> Tensor:
        tt = _timestep_tensor(t, x_t.shape[0], x_t.device)
        a = left_broadcast(self._alpha(tt), x_t.shape)
        pt = self.prediction_type
        if pt == "epsilon":  # x0 = (x − √(1−a) ε)/√a
            return model_output - (a.sqrt() / (1 - a).sqrt()) * delta
        if pt == "sample":
            return model_output + delta
        return model_output - delta / (1 - a).sqrt()  # v: x0 = √a x − √(1−a) v

    def draw_timesteps(self, batch: int, generator: Generator = None, device=None) -> Tensor:
        gen = generator if isinstance(generator, torch.Generator) or generator is None else generator[0]
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=gen, device="cpu").to(device)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        pt = self.prediction_type
        if pt == "epsilon":
            return noise.float()
        if pt == "sample":
            return x0.float()
        tt = _timestep_tensor(t, x0.shape[0], x0.device)
        a = left_broadcast(self._alpha(tt), x0.shape)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


class DDIMKernel(_AlphaKernel):
    """DDIM step with stochasticity `eta` (1.0 behaves like DDPM; DDPO's default).

    Follows diffusers' `DDIMScheduler.step` (previous timestep t − N_train/N, `final_alpha_cumprod` at
    the end, `clip_sample`), adding the Gaussian log-prob. With eta = 0 the sampler is deterministic and
    every log-prob is 0: policy-gradient methods need eta > 0.
    """

    def __init__(self, eta: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        from diffusers import DDIMScheduler

        self.scheduler_class = DDIMScheduler

    def _alpha_prev(self, t: Tensor) -> Tensor:
        prev = t.long() - self.num_train_timesteps // self.num_steps
        final = self._table("final_alpha_cumprod", t.device)
        ac = self._table("alphas_cumprod", t.device)
        return torch.where(prev >= 0, ac[prev.clamp_min(0)], final)

    def mean_std(self, model_output: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a_t, a_prev = self._alpha(t), self._alpha_prev(t)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance.clamp_min(0).sqrt()
        x0, eps = self._x0_eps(model_output, a_t, x)
        ap, s = left_broadcast(a_prev, x.shape), left_broadcast(std, x.shape)
        mean = ap.sqrt() * x0 + (1 - ap - s**2).clamp_min(0).sqrt() * eps
        return mean, s, x0


class DDPMKernel(_AlphaKernel):
    """Ancestral DDPM step (posterior mean and the scheduler's fixed_small / fixed_large variance).

    Follows diffusers' `DDPMScheduler.step`; the previous timestep is the next one in the sampling
    schedule (or none at the end, where the step is deterministic).
    """

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        from diffusers import DDPMScheduler

        self.scheduler_class = DDPMScheduler

    def _check_compatible(self, scheduler: Any) -> None:
        super()._check_compatible(scheduler)
        vt = scheduler.config.get("variance_type", "fixed_small")
        if vt not in ("fixed_small", "fixed_large"):
            raise ValueError(f"DDPMKernel supports variance_type fixed_small or fixed_large, got {vt!r}")

    def _alpha_prev(self, t: Tensor) -> Tensor:
        ts = self.scheduler.timesteps.to(t.device).long()
        # position of each t in the schedule; the previous timestep is the next entry (none after the last)
        pos = (ts[None, :] == t.long()[:, None]).float().argmax(dim=1)
        nxt = ts[(pos + 1).clamp_max(len(ts) - 1)]
        has_prev = pos + 1 < len(ts)
        ac = self._table("alphas_cumprod", t.device)
        return torch.where(has_prev, ac[nxt.clamp_min(0)], torch.ones_like(ac[nxt]))

    def mean_std(self, model_output: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a_t, a_prev = self._alpha(t), self._alpha_prev(t)
        alpha_step = a_t / a_prev
        beta_step = 1 - alpha_step
        x0, _ = self._x0_eps(model_output, a_t, x)
        c0 = left_broadcast(a_prev.sqrt() * beta_step / (1 - a_t), x.shape)
        ct = left_broadcast(alpha_step.sqrt() * (1 - a_prev) / (1 - a_t), x.shape)
        mean = c0 * x0 + ct * x
        if self.scheduler.config.get("variance_type", "fixed_small") == "fixed_large":
            var = beta_step
        else:
            var = ((1 - a_prev) / (1 - a_t) * beta_step).clamp_min(1e-20)
        var = torch.where(t.long() > 0, var, torch.zeros_like(var))
        return mean, left_broadcast(var.sqrt(), x.shape), x0


class _FlowKernel(TransitionKernel):
    """Shared math of rectified-flow kernels: x_σ = (1−σ)x0 + σε, the model predicts v ≈ ε − x0, σ runs from
    1 to 0 over the scheduler's sigmas (its `shift` included). Subclasses set the SDE's mean and std.

    Args:
        noise_level: the stochasticity η of the SDE (each subclass says how it enters; 0 is the ODE).
        deterministic_last_step: take the final step (σ_next = 0) as the deterministic Euler ODE step, so
            the sample carries no last-step noise (pixel-space samples are otherwise grainy). That step then
            has std 0 and log-prob 0: it is not trained by policy gradient.
        reduction: see `TransitionKernel`.
    """

    def __init__(
        self, noise_level: float = 0.7, deterministic_last_step: bool = False, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.noise_level = noise_level
        self.deterministic_last_step = deterministic_last_step
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler_class = FlowMatchEulerDiscreteScheduler

    def _check_compatible(self, scheduler: Any) -> None:
        if hasattr(scheduler, "alphas_cumprod") or "shift" not in scheduler.config:
            raise ValueError(
                f"{type(self).__name__} needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), "
                f"got {type(scheduler).__name__}; epsilon/v backbones use DDIMKernel or DDPMKernel"
            )

    @property
    def prediction_type(self) -> str:
        return "flow"

    def _sigmas(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ts = self.scheduler.timesteps.to(device=t.device, dtype=torch.float32)
        sig = self.scheduler.sigmas.to(device=t.device, dtype=torch.float32)
        pos = (ts[None, :] - t.float()[:, None]).abs().argmin(dim=1)
        return sig[pos], sig[pos + 1]

    @abstractmethod
    def sde_mean_std(self, v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
        """The SDE step's mean and std for velocity `v` at `x` (σ, σ_next broadcast against x)."""

    def mean_std(self, model_output: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sigma, sigma_next = self._sigmas(t)
        s, sn = left_broadcast(sigma, x.shape), left_broadcast(sigma_next, x.shape)
        v = model_output
        mean, std = self.sde_mean_std(v, x, s, sn)
        if self.deterministic_last_step:
            last = left_broadcast(sigma_next <= 0, x.shape)
            mean = torch.where(last, x + v * (sn - s), mean)
            std = torch.where(last, torch.zeros_like(std), std)
        return mean, std, x - s * v

    def ode_mean_std(self, model_output: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sigma, sigma_next = self._sigmas(t)
        s, sn = left_broadcast(sigma, x.shape), left_broadcast(sigma_next, x.shape)
        return x + model_output * (sn - s), torch.zeros_like(s), x - s * model_output

    def pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        x = x_t.float()
        tt = _timestep_tensor(t, x.shape[0], x.device)
        sigma = left_broadcast(tt.float() / self.num_train_timesteps, x.shape)
        return x - sigma * model_output.float()

    def draw_timesteps(self, batch: int, generator: Generator = None, device=None) -> Tensor:
        gen = generator if isinstance(generator, torch.Generator) or generator is None else generator[0]
        sigma = torch.rand((batch,), generator=gen, device="cpu").to(device)
        return sigma * self.num_train_timesteps

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        return noise.float() - x0.float()

    def shift_pred_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor, delta: Tensor) -> Tensor:
        tt = _timestep_tensor(t, x_t.shape[0], x_t.device)
        sigma = left_broadcast(tt.float() / self.num_train_timesteps, x_t.shape).clamp_min(1e-6)
        return model_output - delta / sigma  # x0 = x − σ v

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        tt = _timestep_tensor(t, x0.shape[0], x0.device)
        s = left_broadcast(tt.float() / self.num_train_timesteps, x0.shape)
        return (1 - s) * x0.float() + s * noise.float()


def _marginal_sde(v: Tensor, x: Tensor, sigma: Tensor, dt: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Euler–Maruyama step of the marginal-preserving reverse SDE dx = [v − (g²/2)·s]dσ + g·dW with the score
    s = −(x + (1−σ)v)/σ: mean x + [v + g²/(2σ)·(x + (1−σ)v)]·dt, std g·√(−dt) (formulas.md §8)."""
    mean = x + (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, g * (-dt).clamp_min(0).sqrt()


class FlowSDEKernel(_FlowKernel):
    """Flow-GRPO's SDE step for rectified-flow models (x_σ = (1−σ)x0 + σε, model predicts v ≈ ε − x0).

    g = noise_level·√(σ/(1−σ)), mean = x + [v + g²/(2σ)·(x + (1−σ)v)]·dt, std = g·√(−dt), with
    dt = σ_next − σ < 0. With noise_level → 0 the mean is the Euler ODE step x + v·dt. At σ = 1 the
    scheduler's next sigma stands in for σ in the (1−σ) denominator of g to avoid dividing by zero (as
    Flow-GRPO does: g = noise_level·√(σ/(1−σ₁))). The last step (σ_next = 0) is stochastic like the others
    unless `deterministic_last_step` (then it is the Euler step, with log-prob 0).
    """

    def sde_mean_std(self, v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
        sig_max = self.scheduler.sigmas[1].to(device=x.device, dtype=torch.float32)
        sigma_safe = torch.where(sigma >= 1.0, sig_max, sigma)
        g = self.noise_level * (sigma / (1 - sigma_safe)).sqrt()
        return _marginal_sde(v, x, sigma, sigma_next - sigma, g)


class DanceSDEKernel(_FlowKernel):
    """DanceGRPO's SDE step (`fastvideo/train_grpo_flux.py:flux_step`): the same marginal-preserving reverse
    SDE as `FlowSDEKernel` with a constant diffusion g = noise_level (DanceGRPO's η, 0.3 for FLUX).

    mean = x + [v + η²/(2σ)·(x + (1−σ)v)]·dσ, std = η·√(−dσ). DanceGRPO's time shift σ' = shift·σ/(1 +
    (shift−1)σ) is the scheduler's `shift` (the backbone's `make_scheduler`). With η → 0 the mean is the
    Euler ODE step. `deterministic_last_step` as for `FlowSDEKernel`.
    """

    def __init__(
        self, noise_level: float = 0.3, deterministic_last_step: bool = False, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(noise_level, deterministic_last_step, reduction)

    def sde_mean_std(self, v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.full_like(sigma, float(self.noise_level))
        return _marginal_sde(v, x, sigma, sigma_next - sigma, g)


class CPSKernel(_FlowKernel):
    """Coefficients-preserving sampling (Wang & Yu, arXiv:2509.05952; Flow-Factory's "CPS" dynamics).

    The next state keeps the coefficients of x_σ = (1−σ)x0 + σε exactly: with x̂0 = x − σv and the
    predicted noise x̂1 = x + (1−σ)v, std = σ_next·sin(η·π/2) and

        mean = (1−σ_next)·x̂0 + √(σ_next² − std²)·x̂1,   x' = mean + std·z,

    so the noise of x' has total variance σ_next² (the ODE's) instead of growing with the injected noise.
    η = noise_level (the Flow-GRPO README recommends 0.8). η → 0 gives the Euler ODE step; the last step
    (σ_next = 0) is deterministic by construction (std 0, mean x̂0, log-prob 0).

    The log-prob is the true Gaussian density of the step (formulas.md §2's form). Flow-Factory instead
    scores CPS steps by −mean (x' − mean)², without the 1/(2·std²) scale and the log-std term: its ratios
    are exp of a differently scaled quantity, so its clip ranges do not transfer to this kernel.
    """

    def __init__(
        self, noise_level: float = 0.8, deterministic_last_step: bool = False, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(noise_level, deterministic_last_step, reduction)
        if noise_level > 1:
            raise ValueError(
                f"CPSKernel needs noise_level in [0, 1] (std = σ_next·sin(η·π/2)), got {noise_level}"
            )

    def sde_mean_std(self, v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        x0, x1 = x - sigma * v, x + (1 - sigma) * v
        mean = (1 - sigma_next) * x0 + (sigma_next**2 - std**2).clamp_min(0).sqrt() * x1
        return mean, std
