"""DiffusionNFT and AWM: analytic checks of the losses, the old policy, the forward-process points, and
toy end-to-end runs."""

import math

import pytest
import torch

from diffalign.core.algorithms import AWM, AlignContext, DiffusionNFT, nft_loss
from diffalign.core.forward_process import SoftCopy, point_minibatches, training_timesteps
from diffalign.core.functional import masked_mse
from diffalign.core.kernels import DDPMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward
from diffalign.core.testing import LinearReward, ToyBackbone
from tests.helpers import toy_recipe_gain

BATCH = {"prompt": [0, 1, 2, 3]}


def flow_policy(steps=4, prediction_type="flow"):
    torch.manual_seed(0)
    kernel = FlowSDEKernel(0.7) if prediction_type == "flow" else DDPMKernel()
    return DiffusionPolicy(
        ToyBackbone(hidden=16, depth=2, prediction_type=prediction_type), kernel, num_steps=steps
    )


def ctx_for(policy, seed=0):
    return AlignContext(
        policy, GuardedReward(LinearReward()), torch.Generator().manual_seed(seed), torch.device("cpu")
    )


def points(kernel, batch=6, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, dim, generator=g)
    t = kernel.set_timesteps(10)[torch.randint(0, 10, (batch,), generator=g)]
    x_t = kernel.add_noise(x0, torch.randn(batch, dim, generator=g), t)
    old = torch.randn(batch, dim, generator=g)
    adv = torch.tensor([5.0, -5.0, 2.0, -1.0, 0.0, 7.0])[:batch]
    return x0, t, x_t, old, adv


def kernel_of(prediction_type):
    return flow_policy(prediction_type=prediction_type).kernel


# -- DiffusionNFT loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_nft_loss_at_the_old_policy_is_the_adaptive_x0_error(prediction_type, beta):
    kernel = kernel_of(prediction_type)
    x0, t, x_t, old, adv = points(kernel)
    out = nft_loss(kernel, old.clone(), old, x_t, t, x0, adv, beta, 5.0)
    err = kernel.pred_x0(old, t, x_t) - x0  # v⁺ = v⁻ = v_old: both implicit policies are the old one
    expected = 5.0 * ((err**2).mean(1) / err.abs().mean(1)).mean() / beta
    torch.testing.assert_close(out["loss"], expected)
    assert out["old_deviation"].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_nft_gradient_at_the_old_policy_is_advantage_weighted_x0_regression(prediction_type, beta):
    """∇_v L at v = v_old equals ∇_v mean(A·‖x̂0(v) − x0‖²/(w·D)) for clipped A, for any β."""
    kernel = kernel_of(prediction_type)
    x0, t, x_t, old, adv = points(kernel)
    new = old.clone().requires_grad_(True)
    nft_loss(kernel, new, old, x_t, t, x0, adv, beta, 5.0)["loss"].backward()
    v = old.clone().requires_grad_(True)
    err = kernel.pred_x0(v, t, x_t) - x0
    w = err.detach().abs().mean(1)
    (adv.clamp(-5, 5) * (err**2).mean(1) / w).mean().backward()
    torch.testing.assert_close(new.grad, v.grad, rtol=1e-5, atol=1e-6)


def test_nft_reward_weight_selects_the_positive_or_the_negative_policy():
    kernel = kernel_of("flow")
    x0, t, x_t, old, _ = points(kernel, batch=2)
    new = old + 0.3
    beta = 0.5
    for a, v in ((5.0, beta * new + (1 - beta) * old), (-5.0, (1 + beta) * old - beta * new)):
        adv = torch.full((2,), a)
        out = nft_loss(kernel, new, old, x_t, t, x0, adv, beta, 5.0)
        err = kernel.pred_x0(v, t, x_t) - x0
        torch.testing.assert_close(out["loss"], 5.0 * ((err**2).mean(1) / err.abs().mean(1)).mean() / beta)
        assert out["weight_r"].item() == (1.0 if a > 0 else 0.0)
    # A = 0 weighs both halves equally; a larger |A| than A_max is clipped
    assert nft_loss(kernel, new, old, x_t, t, x0, torch.zeros(2), beta, 5.0)["weight_r"].item() == 0.5
    clipped = nft_loss(kernel, new, old, x_t, t, x0, torch.full((2,), 50.0), beta, 5.0)["loss"]
    torch.testing.assert_close(
        clipped, nft_loss(kernel, new, old, x_t, t, x0, torch.full((2,), 5.0), beta, 5.0)["loss"]
    )


# -- the old policy ---------------------------------------------------------------------------------
def test_soft_copy_decays_exactly_and_swaps_without_leaking():
    net = torch.nn.Linear(3, 2)
    params = list(net.parameters())
    copy = SoftCopy()
    copy.update(params, decay=0.9)  # the first update copies
    first = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    copy.update(params, decay=0.25)
    for v, f, p in zip(copy.values, first, params, strict=True):
        torch.testing.assert_close(v, 0.25 * f + 0.75 * p.detach())
    x = torch.randn(4, 3)
    live = net(x)
    with torch.no_grad(), copy.swapped_in(params):
        old = net(x)
        torch.testing.assert_close(old, torch.nn.functional.linear(x, copy.values[0], copy.values[1]))
    torch.testing.assert_close(net(x), live)  # restored
    again = SoftCopy()
    again.load_state_dict(copy.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.values, copy.values, strict=True))


def test_nft_old_policy_follows_the_decay_schedule():
    algo = DiffusionNFT(decay_rate=0.1, max_decay=0.5, flat_steps=2)
    decays = []
    for n in range(10):
        algo.updates = n
        decays.append(algo.decay())
    assert decays == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])


def test_nft_prepare_builds_points_of_the_forward_process_with_old_outputs():
    policy = flow_policy(steps=5)
    algo = DiffusionNFT(group_size=3, kl_coef=0.0, timestep_fraction=0.6)
    data, metrics = algo.prepare(ctx_for(policy), BATCH)
    assert data.x_t.shape == (12, 3, 2) and data.t.shape == (12, 3)  # J = ⌊5 · 0.6⌋ = 3
    schedule = policy.kernel.set_timesteps(5)
    for row in data.t:  # distinct timesteps of the sampling schedule per sample
        assert len(set(row.tolist())) == 3 and set(row.tolist()) <= set(schedule.tolist())
    sigma = data.t[..., None] / 1000
    noise = data.target + data.x0[:, None]  # flow target ε − x0
    torch.testing.assert_close(data.x_t, (1 - sigma) * data.x0[:, None] + sigma * noise)
    # at the first batch the old policy is the live one: its outputs are the live outputs
    live = policy.backbone.denoise(data.x_t[:, 1], data.t[:, 1], data.cond, None)
    torch.testing.assert_close(data.reference[:, 1], live)
    assert data.advantages.reshape(4, 3).sum(1).abs().max() < 1e-4
    assert metrics["old_decay"] == 0.0
    steps = list(algo.minibatches(data, torch.Generator()))
    assert len(steps) == 1 and algo.updates == 1  # one optimiser step, counted for the decay schedule
    assert len(steps[0]) == 3 and {m.point for m in steps[0]} == {0, 1, 2}  # covering all points


def test_nft_old_policy_lags_the_live_one_after_an_update():
    policy = flow_policy()
    ctx = ctx_for(policy)
    algo = DiffusionNFT(group_size=2, kl_coef=0.0, decay_rate=1.0, max_decay=0.5)
    opt = torch.optim.SGD(policy.backbone.parameters(), lr=0.5)
    data, _ = algo.prepare(ctx, BATCH)
    for micro in next(iter(algo.minibatches(data, ctx.generator))):
        algo(policy, micro)["loss"].backward()
    before = [p.detach().clone() for p in policy.backbone.parameters()]
    opt.step()
    algo.prepare(ctx, BATCH)  # soft update with decay min(1·1, 0.5) = 0.5
    for v, b, p in zip(algo.old.values, before, policy.backbone.parameters(), strict=True):
        torch.testing.assert_close(v, 0.5 * b + 0.5 * p.detach())


def test_nft_kl_is_zero_at_the_reference_and_rollouts_can_use_the_ode():
    policy = flow_policy()
    policy.backbone.freeze_reference()
    ode = FlowSDEKernel(noise_level=0.0)
    algo = DiffusionNFT(group_size=2, kl_coef=0.5, sampler=ode)
    data, _ = algo.prepare(ctx_for(policy), BATCH)
    out = algo(policy, next(iter(algo.minibatches(data, torch.Generator())))[0])
    assert out["kl"].item() == 0.0 and out["loss"].item() == pytest.approx(out["policy_loss"].item())
    assert isinstance(policy.kernel, FlowSDEKernel) and policy.kernel.noise_level == 0.7  # the policy's own
    # the ODE rollout of a seed is deterministic: x0 is the Euler chain from the seed's x_T
    seed = ctx_for(policy).generator
    g = torch.Generator().manual_seed(123)
    cond = policy.backbone.condition({"prompt": [1]})
    with policy.sampling_with(ode):
        a = policy.rollout(cond, [g]).x0
        b = policy.rollout(cond, [torch.Generator().manual_seed(123)]).x0
    assert torch.equal(a, b) and seed is not None


def test_training_timesteps_uniform_draws_over_the_schedule():
    policy = flow_policy()
    t = training_timesteps(policy, 64, 3, "uniform", torch.Generator().manual_seed(0))
    assert t.shape == (64, 3) and (t >= 0).all() and (t < 1000).all() and t.unique().numel() > 100
    with pytest.raises(ValueError, match="schedule"):
        training_timesteps(policy, 4, 9, "schedule", torch.Generator())


def test_point_minibatches_group_samples_and_points_into_optimiser_steps():
    policy = flow_policy()
    data, _ = DiffusionNFT(group_size=2, kl_coef=0.0).prepare(ctx_for(policy), BATCH)  # 8 samples, 3 points
    steps = list(
        point_minibatches(
            data, torch.Generator().manual_seed(0), 2, train_batch_size=2, gradient_accumulation_steps=2
        )
    )
    assert len(steps) == 2 * 2 and all(len(s) == 2 * 3 for s in steps)
    micro = steps[0][0]
    assert micro.x_t.shape == (2, 2) and micro.t.shape == (2,) and micro.x0.shape == (2, 2)


# -- AWM ----------------------------------------------------------------------------------------------
def test_awm_ratio_is_one_before_the_update_and_its_gradient_is_the_weighted_matching_loss():
    policy = flow_policy()
    algo = AWM(group_size=3)
    data, _ = algo.prepare(ctx_for(policy), BATCH)
    micro = next(iter(algo.minibatches(data, torch.Generator())))[0]
    torch.testing.assert_close(  # the stored log-prob is the behaviour policy's −mse at the same point
        micro.reference_log_prob,
        -masked_mse(policy.backbone.denoise(micro.x_t, micro.t, micro.cond), micro.target),
    )
    out = algo(policy, micro)
    assert out["first_update_ratio_dev"].item() == 0.0
    assert out["loss"].item() == pytest.approx(-micro.advantages.mean().item(), abs=1e-6)
    out["loss"].backward()
    got = [p.grad.clone() for p in policy.backbone.parameters()]
    policy.backbone.zero_grad()
    err = masked_mse(policy.backbone.denoise(micro.x_t, micro.t, micro.cond), micro.target)
    (micro.advantages * err).mean().backward()
    for a, b in zip(got, (p.grad for p in policy.backbone.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_awm_works_for_epsilon_models_and_keeps_the_kl_to_the_reference():
    policy = flow_policy(prediction_type="epsilon")
    policy.backbone.freeze_reference()
    algo = AWM(group_size=2, kl_coef=0.1)
    data, _ = algo.prepare(ctx_for(policy), BATCH)
    assert torch.is_floating_point(data.t) is False  # DDPM timesteps of the sampling schedule
    out = algo(policy, next(iter(algo.minibatches(data, torch.Generator())))[0])
    assert out["kl"].item() == 0.0 and math.isfinite(out["loss"].item())
    with torch.no_grad():
        for p in policy.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = algo(policy, next(iter(algo.minibatches(data, torch.Generator())))[0])
    assert out["kl"].item() > 0 and out["ratio_max_dev"].item() > 0


def test_forward_process_methods_refuse_bad_settings():
    with pytest.raises(ValueError):
        DiffusionNFT(beta=0.0)
    with pytest.raises(ValueError):
        AWM(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="WeightedSum"):
        DiffusionNFT(group_size=2, advantage_aggregation="per_reward", kl_coef=0).prepare(
            ctx_for(flow_policy()), BATCH
        )


# -- end to end ---------------------------------------------------------------------------------------
E2E = {  # recipe: (epochs, minimum gain); the ε recipes check the parameterisation the docstrings claim
    "nft_mode": (15, 0.3),
    "awm_mode": (15, 0.3),
    "nft_eps_mode": (15, 0.3),
    "awm_eps_mode": (15, 0.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_toy_recipe_raises_the_reward_beyond_seed_noise(name, tmp_path):
    epochs, min_gain = E2E[name]
    gain, stderr, s = toy_recipe_gain(name, tmp_path, epochs)
    assert gain > min_gain and gain > 10 * stderr, s


def test_nft_old_policy_and_step_count_travel_in_the_module_state():
    policy = flow_policy()
    algo = DiffusionNFT(group_size=2, kl_coef=0.0)
    data, _ = algo.prepare(ctx_for(policy), BATCH)
    list(algo.minibatches(data, torch.Generator()))
    state = algo.state_dict()  # what a Lightning checkpoint stores (nn.Module extra state)
    again = DiffusionNFT(group_size=2, kl_coef=0.0)
    again.load_state_dict(state)
    assert again.updates == algo.updates == 1 and again.synced == algo.synced
    assert all(torch.equal(a, b) for a, b in zip(again.old.values, algo.old.values, strict=True))
