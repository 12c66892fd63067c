"""Transition kernels: analytic log-probs, re-scoring, masks, the ODE limit and parity with diffusers.

Every reference value here is computed independently of `diffalign.core.kernels`: from
`torch.distributions.Normal`, from diffusers' own schedulers, or from the Flow-GRPO formulas written out
in the test (formulas.md §2 and §8).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from diffalign.core.kernels import (
    CPSKernel,
    DanceSDEKernel,
    DDIMKernel,
    DDPMKernel,
    FlowSDEKernel,
    StepOutput,
)

N_TRAIN = 1000
NUM_STEPS = 10
BATCH = 3
EVENT_SHAPES = [(2,), (3, 8), (4, 8, 8), (2, 4, 8, 8)]
EVENT_IDS = ["rank1", "rank2", "rank3", "rank4"]

KERNELS = {
    "ddim_eta1": lambda reduction: DDIMKernel(eta=1.0, reduction=reduction),
    "ddim_eta0.5": lambda reduction: DDIMKernel(eta=0.5, reduction=reduction),
    "ddpm": lambda reduction: DDPMKernel(reduction=reduction),
    "flow_sde": lambda reduction: FlowSDEKernel(noise_level=0.7, reduction=reduction),
    "flow_sde_det_last": lambda reduction: FlowSDEKernel(
        noise_level=0.7, deterministic_last_step=True, reduction=reduction
    ),
    "dance_sde": lambda reduction: DanceSDEKernel(noise_level=0.3, reduction=reduction),
    "cps": lambda reduction: CPSKernel(noise_level=0.8, reduction=reduction),
}
KERNEL_NAMES = list(KERNELS)
FLOW_KERNELS = (FlowSDEKernel, DanceSDEKernel, CPSKernel)


def alpha_scheduler(**kwargs) -> DDPMScheduler:
    cfg = {"num_train_timesteps": N_TRAIN, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
    cfg.update(kwargs)
    return DDPMScheduler(**cfg)


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=1.0)


def make_kernel(name: str, reduction: str = "mean", num_steps: int = NUM_STEPS, **sched_kwargs):
    kernel = KERNELS[name](reduction)
    sched = flow_scheduler() if isinstance(kernel, FLOW_KERNELS) else alpha_scheduler(**sched_kwargs)
    kernel.bind(sched)
    kernel.set_timesteps(num_steps)
    return kernel


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(event, batch: int = BATCH, seed: int = 0, scale: float = 1.0):
    g = gen(seed)
    x = torch.randn((batch, *event), generator=g) * scale
    out = torch.randn((batch, *event), generator=g) * scale
    return x, out


def event_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def normal_log_prob(o: StepOutput, reduction: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference log-prob from torch.distributions.Normal (float64) with the step's own mean/std."""
    lp = Normal(o.mean.double(), o.std.double()).log_prob(o.prev_sample.double())
    dims = event_dims(lp)
    if mask is None:
        return lp.mean(dims) if reduction == "mean" else lp.sum(dims)
    m = (
        mask.double().expand_as(lp)
        if mask.dim() == lp.dim()
        else mask.double().reshape(mask.shape + (1,) * (lp.dim() - mask.dim())).expand_as(lp)
    )
    total = (lp * m).sum(dims)
    return total / m.sum(dims) if reduction == "mean" else total


def stochastic_steps(kernel) -> list[int]:
    """Step indices with std > 0 for every kernel (alpha kernels are deterministic at t = 0, CPS and the
    deterministic-last-step flow kernel at σ_next = 0)."""
    n = kernel.num_steps
    return [0, n // 2, n - 2]


# ---------------------------------------------------------------------------------------------------
# Analytic Gaussian log-prob
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_analytic_gaussian(name, event, reduction):
    kernel = make_kernel(name, reduction)
    x, model_out = inputs(event)
    for i in stochastic_steps(kernel):
        t = kernel.scheduler.timesteps[i]
        o = kernel.step(model_out, t, x, generator=gen(i))
        assert o.prev_sample.shape == o.mean.shape == o.std.shape == o.pred_x0.shape == x.shape
        assert o.log_prob.shape == (BATCH,)
        assert (o.std > 0).all()
        assert not torch.equal(o.prev_sample, o.mean)
        expected = normal_log_prob(o, reduction)
        torch.testing.assert_close(o.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_sum_reduction_is_mean_times_dims(name):
    event = (4, 8, 8)
    x, model_out = inputs(event)
    t = make_kernel(name).scheduler.timesteps[3]
    o_mean = make_kernel(name, "mean").step(model_out, t, x, generator=gen(1))
    o_sum = make_kernel(name, "sum").step(model_out, t, x, generator=gen(1))
    torch.testing.assert_close(o_sum.prev_sample, o_mean.prev_sample)
    torch.testing.assert_close(o_sum.log_prob, o_mean.log_prob * math.prod(event), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_sampled_noise_is_standard_normal(name):
    kernel = make_kernel(name)
    x, model_out = inputs((4, 16, 16), batch=8)
    o = kernel.step(model_out, kernel.scheduler.timesteps[4], x, generator=gen(3))
    z = (o.prev_sample - o.mean) / o.std
    assert abs(z.mean().item()) < 0.05
    assert abs(z.std().item() - 1.0) < 0.05


# ---------------------------------------------------------------------------------------------------
# Re-scoring (ratio == 1) and per-sample timesteps
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_rescoring_gives_ratio_one(name, event):
    kernel = make_kernel(name)
    ts = kernel.scheduler.timesteps
    x, model_out = inputs(event)
    per_sample = ts[torch.tensor([0, NUM_STEPS // 2, NUM_STEPS - 2])]
    assert per_sample.unique().numel() == BATCH
    for t in (ts[2], int(ts[2]) if ts.dtype == torch.long else float(ts[2]), per_sample):
        o = kernel.step(model_out, t, x, generator=gen(5))
        again = kernel.step(model_out, t, x, prev_sample=o.prev_sample)
        torch.testing.assert_close(again.log_prob, o.log_prob, rtol=0, atol=1e-6)
        ratio = torch.exp(again.log_prob - o.log_prob)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)
        assert torch.equal(again.prev_sample, o.prev_sample)
        # a different model output is a different policy: the ratio moves away from 1
        other = kernel.step(model_out + 0.5, t, x, prev_sample=o.prev_sample)
        assert (other.log_prob - o.log_prob).abs().min() > 1e-4


@pytest.mark.parametrize("event", [(2,), (3, 8)], ids=EVENT_IDS[:2])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_per_sample_timesteps_match_row_by_row(name, event):
    kernel = make_kernel(name)
    ts = kernel.scheduler.timesteps
    rows = torch.tensor([NUM_STEPS - 1, 0, NUM_STEPS // 2])  # includes the final step
    t = ts[rows]
    x, model_out = inputs(event)
    o = kernel.step(model_out, t, x, generator=gen(2))
    for r in range(BATCH):
        single = kernel.step(model_out[r : r + 1], t[r], x[r : r + 1], prev_sample=o.prev_sample[r : r + 1])
        torch.testing.assert_close(single.mean, o.mean[r : r + 1])
        torch.testing.assert_close(single.std, o.std[r : r + 1])
        torch.testing.assert_close(single.pred_x0, o.pred_x0[r : r + 1])
        torch.testing.assert_close(single.log_prob, o.log_prob[r : r + 1])
    # rows at different timesteps really get different steps (Dance-SDE's std is constant on a uniform grid)
    assert not (torch.allclose(o.std[1], o.std[2]) and torch.allclose(o.mean[1], o.mean[2]))


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_whole_trajectory_rescored_in_one_flat_batch(name):
    """Roll out T steps, then re-score all (B·T) transitions at once with per-sample timesteps."""
    kernel = make_kernel(name, num_steps=6)
    ts = kernel.scheduler.timesteps
    event = (3, 4)

    def model(x, t):  # a deterministic stand-in for a denoiser, depending on x and t
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        return torch.tanh(x) * 0.5 + (t / N_TRAIN).reshape(-1, 1, 1)

    x = torch.randn((BATCH, *event), generator=gen(0))
    states, log_probs = [x], []
    g = [gen(100 + b) for b in range(BATCH)]
    for t in ts:
        o = kernel.step(model(x, t), t, x, generator=g)
        x = o.prev_sample
        states.append(x)
        log_probs.append(o.log_prob)
    states_t = torch.stack(states, 1)  # (B, T+1, *event)
    lp = torch.stack(log_probs, 1)  # (B, T)
    steps = len(ts)
    x_flat = states_t[:, :-1].reshape(BATCH * steps, *event)
    nxt_flat = states_t[:, 1:].reshape(BATCH * steps, *event)
    t_flat = ts.expand(BATCH, steps).reshape(-1)
    perm = torch.randperm(BATCH * steps, generator=gen(9))
    x_p, t_p = x_flat[perm], t_flat[perm]
    re = kernel.step(model(x_p, t_p), t_p, x_p, prev_sample=nxt_flat[perm])
    torch.testing.assert_close(re.log_prob, lp.reshape(-1)[perm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_log_prob_gradient_reaches_model_output(name):
    kernel = make_kernel(name)
    x, model_out = inputs((3, 8))
    t = kernel.scheduler.timesteps[3]
    o = kernel.step(model_out, t, x, generator=gen(0))
    assert not o.prev_sample.requires_grad
    out = model_out.clone().requires_grad_(True)
    re = kernel.step(out, t, x, prev_sample=o.prev_sample)
    re.log_prob.sum().backward()
    assert torch.isfinite(out.grad).all()
    assert out.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def random_mask(shape, seed=0) -> torch.Tensor:
    m = (torch.rand(shape, generator=gen(seed)) > 0.4).float()
    flat = m.reshape(shape[0], -1)
    flat[:, 0], flat[:, -1] = 1.0, 0.0  # every row has at least one real and one padded entry
    return flat.reshape(shape)


@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mask_removes_noise_and_log_prob_terms(name, event, reduction):
    kernel = make_kernel(name, reduction)
    t = kernel.scheduler.timesteps[3]
    x, model_out = inputs(event)
    mask = random_mask((BATCH, *event))
    o = kernel.step(model_out, t, x, generator=gen(4), mask=mask)
    pad, real = mask == 0, mask == 1
    assert torch.equal(o.prev_sample[pad], x[pad])  # padded entries never change
    assert (o.prev_sample[real] != o.mean[real]).all()
    # real entries get exactly the noise they would get without a mask
    unmasked = kernel.step(model_out, t, x, generator=gen(4))
    torch.testing.assert_close(o.prev_sample[real], unmasked.prev_sample[real])
    expected = normal_log_prob(o, reduction, mask)
    torch.testing.assert_close(o.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # padded entries do not count: moving them changes nothing
    moved = o.prev_sample + 7.0 * (1 - mask)
    again = kernel.step(model_out, t, x, prev_sample=moved, mask=mask)
    torch.testing.assert_close(again.log_prob, o.log_prob, rtol=0, atol=1e-6)
    # ... while without the mask they would
    plain = kernel.step(model_out, t, x, prev_sample=o.prev_sample).log_prob
    assert (kernel.step(model_out, t, x, prev_sample=moved).log_prob < plain - 1e-3).all()


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_lower_rank_mask_broadcasts_over_trailing_dims(name):
    """A (B, L) mask for (B, L, C, D) samples pads whole positions."""
    kernel = make_kernel(name)
    t = kernel.scheduler.timesteps[2]
    event = (4, 8, 8)
    x, model_out = inputs(event)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    o = kernel.step(model_out, t, x, generator=gen(4), mask=mask)
    full = mask[:, :, None, None].expand_as(x)
    assert torch.equal(o.prev_sample[full == 0], x[full == 0])  # padded positions never change
    lp = Normal(o.mean.double(), o.std.double()).log_prob(o.prev_sample.double())
    expected = (lp * full).sum((1, 2, 3)) / full.sum((1, 2, 3))
    torch.testing.assert_close(o.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Flow SDE: ODE limit and the Flow-GRPO formula
# ---------------------------------------------------------------------------------------------------
def flow_grpo_reference(v, x, sigmas, i, a):
    """Flow-GRPO's sde_step_with_logprob mean and std (formulas.md §8), in float64."""
    v, x = v.double(), x.double()
    sigmas = sigmas.double()
    sigma, sigma_next, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1]
    dt = sigma_next - sigma
    g = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
    mean = x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, g * torch.sqrt(-dt)


@pytest.mark.parametrize("noise_level", [0.0, 1e-8])
@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
def test_flow_sde_without_noise_is_euler_ode_step(noise_level, event):
    kernel = FlowSDEKernel(noise_level=noise_level).bind(flow_scheduler())
    kernel.set_timesteps(NUM_STEPS)
    euler = flow_scheduler()
    euler.set_timesteps(NUM_STEPS)
    sigmas = kernel.scheduler.sigmas
    x, v = inputs(event)
    for i, t in enumerate(kernel.scheduler.timesteps):
        o = kernel.step(v, t, x, generator=gen(i))
        dt = sigmas[i + 1] - sigmas[i]
        torch.testing.assert_close(o.mean, x + v * dt, rtol=0, atol=1e-5)
        torch.testing.assert_close(o.mean, euler.step(v, t, x).prev_sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(o.prev_sample, o.mean, rtol=0, atol=1e-5)
        if noise_level == 0.0:
            assert torch.equal(o.std, torch.zeros_like(o.std))
            assert torch.equal(o.log_prob, torch.zeros(BATCH))
        else:
            assert torch.isfinite(o.log_prob).all()
        x = o.prev_sample


@pytest.mark.parametrize("num_steps", [1, 2, 10])
@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_flow_sde_matches_flow_grpo_formula(num_steps, noise_level):
    kernel = FlowSDEKernel(noise_level=noise_level).bind(flow_scheduler())
    kernel.set_timesteps(num_steps)
    sigmas = kernel.scheduler.sigmas
    x, v = inputs((4, 8))
    for i, t in enumerate(kernel.scheduler.timesteps):  # includes the sigma = 1 first step
        o = kernel.step(v, t, x, generator=gen(i))
        mean, std = flow_grpo_reference(v, x, sigmas, i, noise_level)
        assert torch.isfinite(o.mean).all() and torch.isfinite(o.log_prob).all()
        torch.testing.assert_close(o.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.std.double(), std.expand_as(mean), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(o.pred_x0, x - sigmas[i] * v)
        x = o.prev_sample


def dance_reference(v, x, sigmas, i, eta):
    """DanceGRPO's flux_step mean and std (formulas.md §8), in float64."""
    v, x, sigmas = v.double(), x.double(), sigmas.double()
    sigma, dsigma = sigmas[i], sigmas[i + 1] - sigmas[i]
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + (v - 0.5 * eta**2 * score) * dsigma
    return mean, eta * torch.sqrt(-dsigma)


def cps_reference(v, x, sigmas, i, eta):
    """Coefficients-preserving sampling's mean and std (formulas.md §8), in float64."""
    v, x, sigmas = v.double(), x.double(), sigmas.double()
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    std = sigma_next * math.sin(eta * math.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    return (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - std**2) * x1, std


def bound(kernel, num_steps=NUM_STEPS, shift=1.0):
    kernel.bind(FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=shift))
    kernel.set_timesteps(num_steps)
    return kernel


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_dance_sde_matches_dance_grpo_formula(eta, shift):
    kernel = bound(DanceSDEKernel(noise_level=eta), shift=shift)
    sigmas = kernel.scheduler.sigmas
    x, v = inputs((4, 8))
    for i, t in enumerate(kernel.scheduler.timesteps):
        o = kernel.step(v, t, x, generator=gen(i))
        mean, std = dance_reference(v, x, sigmas, i, eta)
        torch.testing.assert_close(o.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.std.double(), std.expand_as(mean), rtol=1e-5, atol=1e-7)
        x = o.prev_sample


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.5, 0.8, 1.0])
def test_cps_matches_formula_and_is_deterministic_at_the_end(eta, shift):
    kernel = bound(CPSKernel(noise_level=eta), shift=shift)
    sigmas = kernel.scheduler.sigmas
    x, v = inputs((4, 8))
    for i, t in enumerate(kernel.scheduler.timesteps):
        o = kernel.step(v, t, x, generator=gen(i))
        mean, std = cps_reference(v, x, sigmas, i, eta)
        torch.testing.assert_close(o.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.std.double(), torch.full_like(mean, float(std)), rtol=1e-5, atol=1e-7)
        x = o.prev_sample
    # the last step (sigma_next = 0) has no noise: the sample is x̂0 and its log-prob is 0
    assert torch.equal(o.std, torch.zeros_like(o.std)) and torch.equal(o.log_prob, torch.zeros(BATCH))
    torch.testing.assert_close(o.prev_sample, o.pred_x0)


@pytest.mark.parametrize("i", [0, 4, 8])
def test_cps_preserves_the_coefficients_of_the_forward_process(i):
    """With the exact velocity of x = (1−σ)x0 + σε, CPS's next state is (1−σ')x0 + σ'ε' with ε' standard
    normal: the injected noise replaces part of the predicted noise instead of adding variance."""
    kernel = bound(CPSKernel(noise_level=0.8))
    sigmas = kernel.scheduler.sigmas
    g = gen(11)
    x0 = torch.randn((4096, 8), generator=g)
    eps = torch.randn((4096, 8), generator=g)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = (1 - sigma) * x0 + sigma * eps
    o = kernel.step(eps - x0, kernel.scheduler.timesteps[i], x, generator=gen(12))
    eps_next = (o.prev_sample - (1 - sigma_next) * x0) / sigma_next
    assert abs(eps_next.mean().item()) < 0.02 and abs(eps_next.std().item() - 1.0) < 0.02
    # and it keeps a fraction cos(η·π/2) of the current noise: ε' = cos(ηπ/2)·ε + sin(ηπ/2)·z
    assert abs((eps_next * eps).mean().item() - math.cos(0.8 * math.pi / 2)) < 0.03


@pytest.mark.parametrize("cls", FLOW_KERNELS)
@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
def test_every_flow_kernel_without_noise_is_the_euler_ode_step(cls, event):
    kernel = bound(cls(noise_level=0.0))
    euler = flow_scheduler()
    euler.set_timesteps(NUM_STEPS)
    x, v = inputs(event)
    for i, t in enumerate(kernel.scheduler.timesteps):
        o = kernel.step(v, t, x, generator=gen(i))
        torch.testing.assert_close(o.mean, euler.step(v, t, x).prev_sample, rtol=0, atol=1e-5)
        assert torch.equal(o.prev_sample, o.mean) and torch.equal(o.log_prob, torch.zeros(BATCH))
        # a tiny noise level stays within float error of the ODE (the limit is continuous)
        tiny = bound(cls(noise_level=1e-6)).step(v, t, x, generator=gen(i))
        torch.testing.assert_close(tiny.mean, o.mean, rtol=0, atol=1e-5)
        x = o.prev_sample


@pytest.mark.parametrize("cls", [FlowSDEKernel, DanceSDEKernel])
def test_deterministic_last_step_is_the_euler_step_and_leaves_the_others_alone(cls):
    plain, det = bound(cls(noise_level=0.7)), bound(cls(noise_level=0.7, deterministic_last_step=True))
    sigmas = plain.scheduler.sigmas
    x, v = inputs((3, 8))
    for i, t in enumerate(plain.scheduler.timesteps):
        a, b = plain.step(v, t, x, generator=gen(i)), det.step(v, t, x, generator=gen(i))
        if i < NUM_STEPS - 1:
            assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
        else:
            assert (a.std > 0).all() and torch.equal(b.std, torch.zeros_like(b.std))
            torch.testing.assert_close(b.prev_sample, x + v * (sigmas[i + 1] - sigmas[i]))
            torch.testing.assert_close(b.prev_sample, b.pred_x0)  # σ_next = 0: the Euler step lands on x̂0
            assert torch.equal(b.log_prob, torch.zeros(BATCH))
    # per-row timesteps: only the rows at the last step become deterministic
    ts = det.scheduler.timesteps
    o = det.step(v, ts[torch.tensor([NUM_STEPS - 1, 3, NUM_STEPS - 1])], x, generator=gen(0))
    assert o.std[0].max() == 0 and o.std[1].min() > 0 and o.std[2].max() == 0


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_deterministic_step_is_the_ode_step_and_keeps_the_random_stream(name):
    kernel = make_kernel(name)
    x, out = inputs((3, 8))
    t = kernel.scheduler.timesteps[4]
    g1, g2 = gen(3), gen(3)
    o = kernel.step(out, t, x, generator=g1, deterministic=True)
    assert torch.equal(o.prev_sample, o.mean) and torch.equal(o.log_prob, torch.zeros(BATCH))
    assert torch.equal(o.std, torch.zeros_like(o.std))
    kernel.step(out, t, x, generator=g2)  # the stochastic step draws the same amount of noise
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))
    # the ODE step is the noise-free limit of the kernel's own family
    if isinstance(kernel, FLOW_KERNELS):
        sig = kernel.scheduler.sigmas
        torch.testing.assert_close(o.mean, x + out * (sig[5] - sig[4]))
    else:
        ode = DDIMKernel(eta=0.0).bind(alpha_scheduler())
        ode.set_timesteps(NUM_STEPS)
        if isinstance(kernel, DDIMKernel):
            torch.testing.assert_close(o.mean, ode.step(out, t, x).mean)
        a_prev = kernel._alpha_prev(torch.tensor([int(t)]))
        x0, eps = kernel._x0_eps(out, kernel._alpha(torch.tensor([int(t)])), x)
        torch.testing.assert_close(o.mean, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)


# ---------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_matches_diffusers_step(prediction_type, eta, clip_sample):
    base = alpha_scheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    kernel = DDIMKernel(eta=eta).bind(base)
    kernel.set_timesteps(NUM_STEPS)
    ref = DDIMScheduler.from_config(base.config)
    ref.set_timesteps(NUM_STEPS)
    assert torch.equal(kernel.scheduler.timesteps, ref.timesteps)
    x, model_out = inputs((2, 4, 8, 8), scale=1.5)
    clipped = False
    for i, t in enumerate(ref.timesteps):
        o = kernel.step(model_out, t, x, generator=gen(10 + i))
        r = ref.step(model_out, t, x, eta=eta, generator=gen(10 + i))
        torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.pred_x0, r.pred_original_sample, rtol=1e-5, atol=1e-5)
        clipped |= bool((r.pred_original_sample.abs() == 1.0).any())
    assert clipped == clip_sample  # the clip branch really ran


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_matches_diffusers_with_per_sample_generators(prediction_type):
    base = alpha_scheduler(prediction_type=prediction_type)
    kernel = DDIMKernel(eta=1.0).bind(base)
    kernel.set_timesteps(NUM_STEPS)
    ref = DDIMScheduler.from_config(base.config)
    ref.set_timesteps(NUM_STEPS)
    x, model_out = inputs((4, 8, 8))
    t = ref.timesteps[4]
    o = kernel.step(model_out, t, x, generator=[gen(s) for s in (7, 8, 9)])
    r = ref.step(model_out, t, x, eta=1.0, generator=[gen(s) for s in (7, 8, 9)])
    torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_eta_zero_is_deterministic_scheduler_step(prediction_type):
    base = alpha_scheduler(prediction_type=prediction_type)
    kernel = DDIMKernel(eta=0.0).bind(base)
    kernel.set_timesteps(NUM_STEPS)
    ref = DDIMScheduler.from_config(base.config)
    ref.set_timesteps(NUM_STEPS)
    x, model_out = inputs((3, 8))
    for t in ref.timesteps:
        o = kernel.step(model_out, t, x, generator=gen(0))
        r = ref.step(model_out, t, x, eta=0.0)
        torch.testing.assert_close(o.mean, r.prev_sample, rtol=1e-5, atol=1e-5)
        assert torch.equal(o.prev_sample, o.mean)
        assert torch.equal(o.std, torch.zeros_like(o.std))
        assert torch.equal(o.log_prob, torch.zeros(BATCH))


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_matches_diffusers_step(prediction_type, variance_type, clip_sample):
    base = alpha_scheduler(
        prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample
    )
    kernel = DDPMKernel().bind(base)
    kernel.set_timesteps(NUM_STEPS)
    ref = DDPMScheduler.from_config(base.config)
    ref.set_timesteps(NUM_STEPS)
    assert torch.equal(kernel.scheduler.timesteps, ref.timesteps)
    x, model_out = inputs((2, 4, 8, 8), scale=1.5)
    for i, t in enumerate(ref.timesteps):
        o = kernel.step(model_out, t, x, generator=gen(20 + i))
        r = ref.step(model_out, t, x, generator=gen(20 + i))
        torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.pred_x0, r.pred_original_sample, rtol=1e-5, atol=1e-5)
        if int(t) > 0:
            assert (o.std > 0).all()
        else:  # the last step is deterministic, as in diffusers
            assert torch.equal(o.prev_sample, o.mean)
            assert torch.equal(o.log_prob, torch.zeros(BATCH))


# ---------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bfloat16_inputs_are_computed_in_float32(name, event):
    kernel = make_kernel(name)
    t = kernel.scheduler.timesteps[3]
    x, model_out = inputs(event)
    x16, out16 = x.bfloat16(), model_out.bfloat16()
    o16 = kernel.step(out16, t, x16, generator=gen(1))
    for value in (o16.prev_sample, o16.log_prob, o16.mean, o16.std, o16.pred_x0):
        assert value.dtype == torch.float32
    # identical to the float32 computation on the same (rounded) inputs
    o32 = kernel.step(out16.float(), t, x16.float(), generator=gen(1))
    for a, b in ((o16.prev_sample, o32.prev_sample), (o16.mean, o32.mean), (o16.log_prob, o32.log_prob)):
        assert torch.equal(a, b)
    # close to the full-precision inputs' result
    full = kernel.step(model_out, t, x, generator=gen(1))
    torch.testing.assert_close(o16.mean, full.mean, rtol=0, atol=0.05)
    # re-scoring a bf16-stored sample under float32 recomputation is consistent
    again = kernel.step(out16, t, x16, prev_sample=o16.prev_sample.bfloat16())
    assert again.log_prob.dtype == torch.float32
    assert kernel.pred_x0(out16, t, x16).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Training samples and x̂0
# ---------------------------------------------------------------------------------------------------
def kernel_for_prediction(prediction_type: str):
    if prediction_type == "flow":
        kernel = FlowSDEKernel().bind(flow_scheduler())
    else:
        kernel = DDPMKernel().bind(alpha_scheduler(prediction_type=prediction_type))
    kernel.set_timesteps(NUM_STEPS)
    return kernel


@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES + ["flow"])
def test_training_sample_is_consistent_with_prediction_type(prediction_type, event):
    kernel = kernel_for_prediction(prediction_type)
    batch = 64
    x0 = torch.randn((batch, *event), generator=gen(0))
    x_t, t, target = kernel.training_sample(x0, generator=gen(1))
    assert x_t.shape == target.shape == x0.shape
    assert t.shape == (batch,)
    assert ((t >= 0) & (t < N_TRAIN)).all()
    assert t.unique().numel() > batch // 2  # timesteps are drawn per sample
    again = kernel.training_sample(x0, generator=gen(1))
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, target), again, strict=True))
    if prediction_type == "flow":
        sigma = (t / N_TRAIN).reshape(batch, *([1] * len(event)))
        torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * (target + x0))
        noise = target + x0
    else:
        assert not t.is_floating_point()
        ref = alpha_scheduler(prediction_type=prediction_type)
        a = ref.alphas_cumprod[t].reshape(batch, *([1] * len(event)))
        if prediction_type == "epsilon":
            noise = target
            torch.testing.assert_close(x_t, ref.add_noise(x0, target, t))
        else:
            noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            if prediction_type == "sample":
                assert torch.equal(target, x0)
            else:
                torch.testing.assert_close(target, ref.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-4)
    # the noise is standard normal and independent of x0
    assert abs(noise.mean().item()) < 0.15
    assert abs(noise.std().item() - 1.0) < 0.15
    assert abs((noise * x0).mean().item()) < 0.15


def forward_noising(prediction_type: str, x0, eps, t):
    """x_t and the true regression target for each prediction type, without the kernel."""
    if prediction_type == "flow":
        sigma = (t.float() / N_TRAIN).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - sigma) * x0 + sigma * eps, eps - x0
    ref = alpha_scheduler(prediction_type=prediction_type)
    x_t = ref.add_noise(x0, eps, t)
    target = {"epsilon": eps, "sample": x0, "v_prediction": ref.get_velocity(x0, eps, t)}[prediction_type]
    return x_t, target


@pytest.mark.parametrize("event", EVENT_SHAPES, ids=EVENT_IDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES + ["flow"])
def test_pred_x0_inverts_forward_noising(prediction_type, event):
    kernel = kernel_for_prediction(prediction_type)
    x0, eps = inputs(event)
    per_sample = torch.tensor([20, 400, 800])
    x_t, target = forward_noising(prediction_type, x0, eps, per_sample)
    torch.testing.assert_close(kernel.pred_x0(target, per_sample, x_t), x0, rtol=1e-4, atol=1e-4)
    # a scalar timestep applies to every row
    x_t, target = forward_noising(prediction_type, x0, eps, torch.full((BATCH,), 400))
    torch.testing.assert_close(kernel.pred_x0(target, 400, x_t), x0, rtol=1e-4, atol=1e-4)
    # the wrong target does not invert
    assert not torch.allclose(kernel.pred_x0(target + 1.0, 400, x_t), x0, atol=1e-2)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES + ["flow"])
def test_step_pred_x0_equals_pred_x0(prediction_type):
    kernel = kernel_for_prediction(prediction_type)
    x, out = inputs((3, 8))
    t = kernel.scheduler.timesteps[kernel.scheduler.timesteps.new_tensor([1, 4, 7]).long()]
    torch.testing.assert_close(kernel.step(out, t, x, generator=gen(0)).pred_x0, kernel.pred_x0(out, t, x))


# ---------------------------------------------------------------------------------------------------
# Binding and argument errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", FLOW_KERNELS)
@pytest.mark.parametrize("sched", [alpha_scheduler, lambda: DDIMScheduler(num_train_timesteps=N_TRAIN)])
def test_flow_kernel_refuses_alpha_scheduler(sched, cls):
    with pytest.raises(ValueError, match="flow-matching"):
        cls().bind(sched())


@pytest.mark.parametrize("cls", [DDIMKernel, DDPMKernel])
def test_alpha_kernels_refuse_flow_scheduler(cls):
    with pytest.raises(ValueError, match="alphas_cumprod.*FlowSDEKernel"):
        cls().bind(flow_scheduler())


@pytest.mark.parametrize("cls", [DDIMKernel, DDPMKernel])
def test_alpha_kernels_refuse_unsupported_configs(cls):
    with pytest.raises(ValueError, match="prediction_type"):
        cls().bind(alpha_scheduler(prediction_type="flow"))
    with pytest.raises(ValueError, match="thresholding"):
        cls().bind(alpha_scheduler(thresholding=True))


def test_ddpm_kernel_refuses_learned_variance():
    with pytest.raises(ValueError, match="variance_type"):
        DDPMKernel().bind(alpha_scheduler(variance_type="learned_range"))
    DDIMKernel().bind(alpha_scheduler(variance_type="learned_range"))  # DDIM does not use it


@pytest.mark.parametrize("factory", [DDIMKernel, DDPMKernel, FlowSDEKernel, DanceSDEKernel, CPSKernel])
def test_bad_reduction_raises(factory):
    with pytest.raises(ValueError, match="reduction"):
        factory(reduction="max")


def test_bad_eta_and_noise_level_raise():
    with pytest.raises(ValueError, match="eta"):
        DDIMKernel(eta=-0.1)
    for cls in FLOW_KERNELS:
        with pytest.raises(ValueError, match="noise_level"):
            cls(noise_level=-0.1)
    with pytest.raises(ValueError, match=r"noise_level in \[0, 1\]"):
        CPSKernel(noise_level=1.5)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_step_before_set_timesteps_raises(name):
    kernel = KERNELS[name]("mean")
    x, out = inputs((2,))
    with pytest.raises(RuntimeError, match="bind"):
        kernel.step(out, 500, x)
    sched = flow_scheduler() if isinstance(kernel, FLOW_KERNELS) else alpha_scheduler()
    kernel.bind(sched)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        kernel.step(out, 500, x)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_bind_builds_own_scheduler(name):
    kernel = KERNELS[name]("mean")
    sched = flow_scheduler() if isinstance(kernel, FLOW_KERNELS) else alpha_scheduler()
    sched.set_timesteps(50)
    before = sched.timesteps.clone()
    kernel.bind(sched)
    ts = kernel.set_timesteps(4)
    assert kernel.scheduler is not sched
    assert torch.equal(sched.timesteps, before)
    assert ts.shape == (4,) and kernel.num_steps == 4
    assert (ts[:-1] > ts[1:]).all()  # sampling order: noisy to clean
    assert kernel.num_train_timesteps == N_TRAIN
    expected = "flow" if isinstance(kernel, FLOW_KERNELS) else "epsilon"
    assert kernel.prediction_type == expected
