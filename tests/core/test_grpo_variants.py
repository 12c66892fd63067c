"""GRPO refinements: GRPO-Guard's ratio, the SDE window (MixGRPO) with sparse storage, per-reward
advantages (GDPO), Pref-GRPO's win rates; D3PO's undecided pairs; AlignProp's truncation strategies; toy
end-to-end runs."""

import math

import pytest
import torch

from diffalign.core.advantages import pairwise_win_rates, per_reward_advantages, rollout_advantages
from diffalign.core.algorithms import D3PO, GRPO, AlignContext, AlignProp, GRPOGuard, PrefGRPO
from diffalign.core.judges import RewardJudge
from diffalign.core.kernels import CPSKernel, DDIMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.policy_gradient import SDEWindow, guarded_log_ratio, step_minibatches
from diffalign.core.reward import GuardedReward, WeightedSum
from diffalign.core.testing import LinearReward, ToyBackbone
from diffalign.core.types import Batch
from tests.helpers import toy_recipe_gain

BATCH = {"prompt": [0, 1, 2, 3]}


def make_policy(kernel=None, steps=6, prediction_type="flow"):
    torch.manual_seed(0)
    kernel = kernel or (FlowSDEKernel(0.7) if prediction_type == "flow" else DDIMKernel(1.0))
    return DiffusionPolicy(
        ToyBackbone(hidden=16, depth=2, prediction_type=prediction_type), kernel, num_steps=steps
    )


def ctx_for(policy, reward=None, seed=0):
    guarded = GuardedReward(reward or LinearReward())
    return AlignContext(policy, guarded, torch.Generator().manual_seed(seed), torch.device("cpu"))


def perturb(module, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# -- GRPO-Guard --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_guarded_log_ratio_is_z_times_the_mean_shift(reduction):
    """log ρ̃ = s·log ρ + reduce(Δ²)/(2s) = reduce(z·Δ) for x' = μ_old + s·z (module docstring)."""
    kernel = FlowSDEKernel(0.7, reduction=reduction).bind(make_policy().backbone.make_scheduler())
    kernel.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    t = kernel.scheduler.timesteps[torch.tensor([0, 2, 4, 6, 8])]
    old = kernel.step(v_old, t, x, generator=g)
    new = kernel.step(v_old + 0.2 * torch.randn(5, 3, 4, generator=g), t, x, prev_sample=old.prev_sample)
    z, delta = (old.prev_sample - old.mean) / old.std, new.mean - old.mean
    expected = (z * delta).mean((1, 2)) if reduction == "mean" else (z * delta).sum((1, 2))
    got = guarded_log_ratio(new, old.log_prob, old.mean, None, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_guarded_ratio_removes_the_negative_bias_of_the_sde_ratio():
    kernel = FlowSDEKernel(0.7).bind(make_policy().backbone.make_scheduler())
    kernel.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    n = 20000
    x, v = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    t = kernel.scheduler.timesteps[8]  # a low-noise step: the plain ratio's bias is large there
    old = kernel.step(v, t, x, generator=g)
    new = kernel.step(v + 0.5, t, x, prev_sample=old.prev_sample)
    raw = new.log_prob - old.log_prob
    s = old.std[0, 0]
    bias = -((new.mean - old.mean) ** 2).mean(1) / (2 * s**2)  # E[log ρ] for the mean-reduced log-prob
    assert abs(raw.mean().item() - bias.mean().item()) < 0.1 * abs(bias.mean().item())
    guarded = guarded_log_ratio(new, old.log_prob, old.mean, None, "mean")
    assert abs(guarded.mean().item()) < 4 * guarded.std().item() / math.sqrt(n)  # unbiased
    assert guarded.std() < raw.std() * s * 1.01  # and 1/s less spread: the per-step reweighting


def test_guarded_ratio_is_zero_on_deterministic_steps():
    kernel = CPSKernel(0.8).bind(make_policy().backbone.make_scheduler())
    kernel.set_timesteps(4)
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    t = kernel.scheduler.timesteps[-1]  # CPS's last step has std 0
    old = kernel.step(v, t, x)
    new = kernel.step(v + 1.0, t, x, prev_sample=old.prev_sample)
    assert torch.equal(guarded_log_ratio(new, old.log_prob, old.mean, None, "mean"), torch.zeros(3))


@pytest.mark.parametrize("kernel", [FlowSDEKernel(0.7), CPSKernel(0.8)], ids=["flow_sde", "cps"])
def test_grpo_guard_stores_the_behaviour_means_and_starts_at_ratio_one(kernel):
    policy = make_policy(kernel)
    algo = GRPOGuard(group_size=3)
    traj, _ = algo.prepare(ctx_for(policy), BATCH)
    assert traj.extras["means"].shape == (12, 6, 2)
    step = torch.zeros(12, dtype=torch.long) + 2
    torch.testing.assert_close(policy.log_prob(traj, step).mean, traj.extras["means"][:, 2])
    micro = next(iter(algo.minibatches(traj, torch.Generator())))[0]
    out = algo(policy, micro)
    assert out["first_update_ratio_dev"].item() < 1e-6 and out["raw_log_ratio_mean"].item() == 0.0
    perturb(policy.backbone)
    out = algo(policy, micro)
    assert out["raw_log_ratio_mean"].item() < 0  # the plain SDE ratio is biased low ...
    assert out["ratio_max_dev"].item() > 0  # ... the guarded one moves, unbiased


# -- SDE window (MixGRPO) ----------------------------------------------------------------------------
def test_rollout_with_an_sde_window_is_ode_outside_and_stores_only_the_window():
    policy = make_policy(steps=6)
    cond = policy.backbone.condition(BATCH)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731
    traj = policy.rollout(cond, gens(), sde_window=(2, 4))
    assert (
        traj.states.shape == (4, 3, 2) and traj.log_probs.shape == (4, 2) and traj.timesteps.shape == (4, 2)
    )
    assert traj.extras["schedule_steps"] == 6 and traj.extras["step_offset"] == 2
    # the steps outside the window are the ODE: rebuild the whole chain by hand
    kernel = policy.kernel
    x, _ = policy.backbone.init_noise(cond, gens_ := gens())
    ts = kernel.set_timesteps(6)
    with torch.no_grad():
        for i, t in enumerate(ts):
            out = policy.model_output(x, t.expand(4), cond)
            x = kernel.step(out, t, x, generator=gens_, deterministic=not 2 <= i < 4).prev_sample
            if i == 1:
                torch.testing.assert_close(traj.states[:, 0], x)
    torch.testing.assert_close(traj.x0, x)
    # re-scoring the window's steps reproduces the stored log-probs (ratio 1)
    for j in range(2):
        torch.testing.assert_close(policy.log_prob(traj, j).log_prob, traj.log_probs[:, j], rtol=0, atol=1e-6)
    # the full window is the plain SDE rollout
    full = policy.rollout(cond, gens(), sde_window=(0, 6))
    plain = policy.rollout(cond, gens())
    assert torch.equal(full.x0, plain.x0) and torch.equal(full.states, plain.states)
    with pytest.raises(ValueError, match="sde_window"):
        policy.rollout(cond, gens(), sde_window=(3, 3))


def test_sde_window_schedules():
    prog = SDEWindow(size=2, shift_every=2)
    starts = []
    for _ in range(12):
        starts.append(prog.window(6, torch.Generator())[0])
        prog.advance()
    assert starts == [0, 0, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4]  # then stays at the last position
    back = SDEWindow(size=2, shift_every=1, stride=1, roll_back=True)
    seq = []
    for _ in range(7):
        seq.append(back.window(5, torch.Generator())[0])
        back.advance()
    assert seq == [0, 1, 2, 3, 0, 1, 2]
    rnd = SDEWindow(size=3, schedule="random")
    g = torch.Generator().manual_seed(0)
    seen = {rnd.window(6, g) for _ in range(200)}
    assert seen == {(s, s + 3) for s in range(4)}
    state = prog.state_dict()
    again = SDEWindow(size=2, shift_every=2)
    again.load_state_dict(state)
    assert again.window(6, torch.Generator()) == prog.window(6, torch.Generator())


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_grpo_with_a_window_trains_only_the_window(prediction_type):
    policy = make_policy(steps=6, prediction_type=prediction_type)
    algo = GRPO(group_size=2, sde_window_size=2, sde_window_shift_every=1)
    ctx = ctx_for(policy)
    traj, metrics = algo.prepare(ctx, BATCH)
    assert traj.num_steps == 2 and metrics["sde_window_start"] == 0.0
    steps = [m.step for group in step_minibatches(traj, torch.Generator()) for m in group]
    assert {int(s) for st in steps for s in st} == {0, 1}
    out = algo(policy, next(iter(algo.minibatches(traj, torch.Generator())))[0])
    assert out["first_update_ratio_dev"].item() < 1e-6
    _, metrics = algo.prepare(ctx, BATCH)
    assert metrics["sde_window_start"] == 2.0  # moved after one batch
    assert algo.algorithm_state()["sde_window"] == {"batches": 2}


# -- per-reward advantages (GDPO) --------------------------------------------------------------------
def test_per_reward_advantages_normalise_each_term_within_its_group():
    groups = torch.tensor([0, 0, 1, 1])
    terms = {"big": torch.tensor([0.0, 100.0, 100.0, 0.0]), "small": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    adv, metrics = per_reward_advantages(terms, {"big": 1.0, "small": 1.0}, groups)
    # each term is ±1 within its group: big gives (−1, +1, +1, −1), small (+1, −1, +1, −1)
    combined = torch.tensor([0.0, 0.0, 2.0, -2.0])
    torch.testing.assert_close(adv, (combined - combined.mean()) / (combined.std(unbiased=False) + 1e-6))
    assert metrics == {"zero_std_ratio/big": 0.0, "zero_std_ratio/small": 0.0}
    # normalising the sum instead lets the large-scale term decide alone
    sum_adv, _ = rollout_advantages(terms["big"] + terms["small"], groups)
    assert torch.equal(sum_adv.sign(), torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    # a weight scales its term's share; a constant term contributes nothing
    adv2, m2 = per_reward_advantages({"a": torch.tensor([1.0, 1.0, 0.0, 2.0])}, {"a": 2.0}, groups)
    assert m2["zero_std_ratio/a"] == 0.5 and adv2[0] == adv2[1]


def test_per_reward_advantages_with_the_batch_std_keep_a_term_nearly_constant_in_its_groups_small():
    groups = torch.tensor([0, 0, 1, 1])
    # "flat" differs by 0.001 inside each group but by 1 between groups; "motion" by ±1 inside each group
    terms = {"flat": torch.tensor([0.0, 0.001, 1.0, 1.001]), "motion": torch.tensor([1.0, -1.0, -1.0, 1.0])}
    weights = {"flat": 1.0, "motion": 1.0}
    by_group, _ = per_reward_advantages(terms, weights, groups)
    by_batch, _ = per_reward_advantages(terms, weights, groups, std_scope="global")
    # group std: flat's 0.001 becomes ±1, as large as motion's, and cancels it on rows 0 and 1
    assert by_group[0].abs() < 1e-4 and by_group[1].abs() < 1e-4
    # batch std (flat: ≈ 0.5, motion: 1): flat adds ±0.001, motion decides every sign
    total = torch.tensor(
        [-0.0005 / 0.5005 + 1.0, 0.0005 / 0.5005 - 1.0, -0.0005 / 0.5005 - 1.0, 0.0005 / 0.5005 + 1.0]
    )
    torch.testing.assert_close(by_batch, (total - total.mean()) / (total.std(unbiased=False) + 1e-6))
    assert torch.equal(by_batch.sign(), terms["motion"].sign())
    # GRPO's std_scope reaches the per-term normalisation
    adv, _ = rollout_advantages(sum(terms.values()), groups, terms, weights, std_scope="global")
    torch.testing.assert_close(adv, by_batch)


def test_grpo_per_reward_option_uses_the_weighted_sum_terms():
    policy = make_policy()
    reward = WeightedSum([LinearReward(weight=[1.0, 0.0]), LinearReward(weight=[0.0, 100.0])], [1.0, 1.0])
    algo = GRPO(group_size=4, advantage_aggregation="per_reward")
    traj, metrics = algo.prepare(ctx_for(policy, reward), BATCH)
    names = reward.term_names()
    terms = {n: traj.extras["reward_terms"][n] for n in names}
    expected, _ = per_reward_advantages(
        terms, dict(zip(names, [1.0, 1.0], strict=True)), traj.extras["group"]
    )
    torch.testing.assert_close(traj.advantages, expected.clamp(-5, 5))
    assert f"zero_std_ratio/{names[0]}" in metrics
    with pytest.raises(ValueError, match="WeightedSum"):
        algo.prepare(ctx_for(policy, LinearReward()), BATCH)


# -- Pref-GRPO ---------------------------------------------------------------------------------------
def test_pairwise_win_rates():
    p = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]])
    torch.testing.assert_close(pairwise_win_rates(p), torch.tensor([1.0, 0.25, 0.25]))


def test_pref_grpo_rewards_are_within_group_ranks_without_a_judge():
    policy = make_policy()
    algo = PrefGRPO(group_size=4)
    ctx = ctx_for(policy)
    traj, metrics = algo.prepare(ctx, BATCH)
    win, _ = algo.win_rates(ctx, traj)
    for g in range(4):
        r = traj.rewards[traj.extras["group"] == g]
        ranks = r.argsort().argsort().float()  # 0 … 3
        torch.testing.assert_close(win[traj.extras["group"] == g], ranks / 3)
    assert metrics["win_rate_spread"] > 0 and "judge_pairs" not in metrics


def test_pref_grpo_with_a_judge_asks_every_pair_of_a_group():
    policy = make_policy()
    judge = RewardJudge(LinearReward(), temperature=0.5)
    algo = PrefGRPO(judge=judge, group_size=3)
    ctx = ctx_for(policy)
    traj, metrics = algo.prepare(ctx, BATCH)
    assert metrics["judge_pairs"] == 4 * 3  # G(G−1)/2 = 3 pairs per group
    win, _ = algo.win_rates(ctx, traj)
    r = LinearReward()(traj.x0).scores
    for g in range(4):
        rows = (traj.extras["group"] == g).nonzero().flatten()
        rg = r[rows]
        expected = torch.sigmoid((rg[:, None] - rg[None, :]) / 0.5)
        torch.testing.assert_close(win[rows], pairwise_win_rates(expected), rtol=1e-5, atol=1e-6)
    assert "_judge" not in dict(algo.named_modules())  # the judge stays out of checkpoints


# -- D3PO undecided pairs ----------------------------------------------------------------------------
def test_d3po_keeping_undecided_pairs_scales_the_gradient_by_the_decided_fraction():
    torch.manual_seed(0)
    policy = DiffusionPolicy(ToyBackbone(hidden=16, depth=2), num_steps=4)
    policy.backbone.freeze_reference()
    perturb(policy.backbone)  # away from the reference, so the DPO loss has a gradient
    reward = WeightedSum([LinearReward(weight=[1.0, 0.0]), LinearReward(weight=[0.0, 1.0])])
    algo = D3PO(beta=0.1, keep_undecided=True)
    pairs, metrics = algo.prepare(ctx_for(policy, reward), {"prompt": [0, 1, 2, 3] * 4})
    assert len(pairs.winner) == 16 and 0 < metrics["pair_fraction"] < 1
    decided = pairs.preference > 0
    assert metrics["pair_fraction"] == pytest.approx(decided.float().mean().item())
    dropping, _ = D3PO(beta=0.1).prepare(ctx_for(policy, reward), {"prompt": [0, 1, 2, 3] * 4})
    assert len(dropping.winner) == int(decided.sum())  # the default drops them
    step = torch.full((16,), 1)

    def grad(rows):
        policy.backbone.zero_grad()
        micro = Batch(
            winner=pairs.winner[rows],
            loser=pairs.loser[rows],
            preference=pairs.preference[rows],
            step=step[rows],
        )
        out = algo(policy, micro)
        out["loss"].backward()
        return out, torch.cat([p.grad.flatten() for p in policy.backbone.parameters()])

    _, g_all = grad(torch.arange(16))
    _, g_decided = grad(decided.nonzero().flatten())
    torch.testing.assert_close(g_all, decided.float().mean() * g_decided, rtol=1e-4, atol=1e-8)
    # an undecided pair alone costs log 2 and pushes nowhere
    out, g_none = grad((~decided).nonzero().flatten())
    assert out["loss"].item() == pytest.approx(math.log(2)) and g_none.abs().max() == 0


# -- AlignProp truncation ----------------------------------------------------------------------------
def test_alignprop_truncation_strategies_follow_the_paper():
    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=10)
    g = torch.Generator().manual_seed(0)
    fixed = AlignProp(backprop_strategy="fixed", backprop_kwargs={"value": 7})
    assert {fixed.grad_steps(policy, g) for _ in range(20)} == {3}  # K = T − b
    assert AlignProp(backprop_strategy="fixed").grad_steps(policy, g) == 1  # the paper's 49 of 50: K = 1
    uni = AlignProp(backprop_strategy="uniform", backprop_kwargs={"min": 0, "max": 10})
    assert {uni.grad_steps(policy, g) for _ in range(400)} == set(range(1, 10))  # b ∈ [1, 10): K < T
    gauss = AlignProp(backprop_strategy="gaussian", backprop_kwargs={"mean": 7.0, "std": 1.5})
    ks = torch.tensor([gauss.grad_steps(policy, g) for _ in range(2000)]).float()
    assert ks.min() >= 1 and ks.max() <= 9
    assert abs(ks.mean().item() - (10 - 6.5)) < 0.2  # E[⌊N(7, 1.5)⌋] ≈ 6.5
    default_gauss = AlignProp(backprop_strategy="gaussian")  # the paper's 42 ± 5 of 50, scaled to T = 10
    assert 1 <= default_gauss.grad_steps(policy, g) <= 9
    with pytest.raises(ValueError, match="keys"):
        AlignProp(backprop_strategy="gaussian", backprop_kwargs={"mean": 1.0})
    with pytest.raises(ValueError, match="not in"):
        AlignProp(backprop_strategy="fixed", backprop_kwargs={"value": 49}).grad_steps(policy, g)
    with pytest.raises(ValueError, match="almost never"):
        AlignProp(backprop_strategy="gaussian", backprop_kwargs={"mean": 42.0, "std": 1.0}).grad_steps(
            policy, g
        )


# -- end to end ------------------------------------------------------------------------------------
E2E = {  # recipe: (epochs, minimum gain)
    "grpo_guard_mode": (15, 0.3),
    "grpo_window_mode": (15, 0.3),
    "grpo_gdpo_mode": (15, 0.3),
    "pref_grpo_mode": (15, 0.3),
    "grpo_cps_mode": (15, 0.3),
    "grpo_dance_mode": (15, 0.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_toy_recipe_raises_the_reward_beyond_seed_noise(name, tmp_path):
    epochs, min_gain = E2E[name]
    gain, stderr, s = toy_recipe_gain(name, tmp_path, epochs)
    assert gain > min_gain and gain > 10 * stderr, s
