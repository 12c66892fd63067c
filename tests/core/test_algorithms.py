"""DPOK, GRPO, DRaFT-K/LV, AlignProp, ReFL, RWR, RAFT: analytic unit checks and toy end-to-end runs."""

import pytest
import torch

from diffalign.core.advantages import group_advantages, per_reward_advantages, term_weights
from diffalign.core.algorithms import (
    DPOK,
    GRPO,
    RAFT,
    RWR,
    AlignContext,
    AlignProp,
    DRaFT,
    ReFL,
    reward_weights,
    select_top,
)
from diffalign.core.module import AlignmentModule
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward, WeightedSum
from diffalign.core.testing import ConstantReward, LinearReward, ToyBackbone
from tests.helpers import toy_recipe_gain

BATCH = {"prompt": [0, 1, 2, 3]}


def make_ctx(reward=None, steps=4, seed=0):
    torch.manual_seed(seed)
    policy = DiffusionPolicy(ToyBackbone(hidden=16, depth=2), num_steps=steps)
    guarded = GuardedReward(reward or LinearReward())
    return AlignContext(policy, guarded, torch.Generator().manual_seed(seed), torch.device("cpu"))


class CallRecorder:
    """Wraps backbone.denoise and records, per call, the batch size and whether it keeps a graph."""

    def __init__(self, backbone):
        self.calls, self.inner = [], backbone.denoise
        backbone.denoise = self

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        self.calls.append((x.shape[0], out.requires_grad))
        return out


# -- DPOK ------------------------------------------------------------------------------------------
def test_dpok_kl_is_zero_when_policy_equals_reference_and_positive_after_an_update():
    ctx = make_ctx()
    algo = DPOK(kl_coef=0.5, advantages="batch")
    ctx.policy.backbone.freeze_reference()
    traj, _ = algo.prepare(ctx, BATCH)
    micro = next(iter(algo.minibatches(traj, torch.Generator())))[0]
    out = algo(ctx.policy, micro)
    assert out["kl"].item() == 0.0 and torch.isclose(out["loss"], out["policy_loss"])
    with torch.no_grad():
        for p in ctx.policy.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = algo(ctx.policy, micro)
    assert out["kl"].item() > 0 and out["loss"].item() == pytest.approx(
        out["policy_loss"].item() + 0.5 * out["kl"].item(), rel=1e-5
    )


def test_dpok_needs_a_positive_kl_and_a_reference():
    with pytest.raises(ValueError, match="kl_coef > 0"):
        DPOK(kl_coef=0.0)
    assert DPOK().needs_reference and not GRPO().needs_reference and GRPO(kl_coef=0.1).needs_reference


# -- GRPO ------------------------------------------------------------------------------------------
def test_group_advantages_are_centred_per_group_and_zero_for_flat_groups():
    r = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, zero = group_advantages(r, g)
    assert torch.allclose(adv[:3].mean(), torch.tensor(0.0), atol=1e-6) and adv[0] < 0 < adv[2]
    assert torch.equal(adv[3:], torch.zeros(3)) and zero == 0.5
    adv_global, _ = group_advantages(r, g, "global")
    assert torch.allclose(adv_global[:3], (r[:3] - 3.0) / (r.std(unbiased=False) + 1e-4))


@pytest.mark.parametrize("shared", [True, False])
def test_grpo_samples_groups_with_optional_shared_noise(shared):
    ctx = make_ctx()
    algo = GRPO(group_size=3, shared_noise=shared)
    traj, metrics = algo.prepare(ctx, BATCH)
    assert len(traj) == 12 and traj.extras["group"].tolist() == [i // 3 for i in range(12)]
    x_T = traj.states[:, 0].reshape(4, 3, 2)
    assert torch.equal(x_T[:, 0], x_T[:, 1]) == shared
    assert traj.advantages.reshape(4, 3).sum(1).abs().max() < 1e-4
    assert "zero_std_ratio" in metrics


def test_grpo_per_reward_advantages_use_the_weighted_sum_terms():
    """GDPO through GRPO: each WeightedSum term is normalised in its group, so a term on a 100x smaller
    scale still moves the advantages as much as its weight says."""
    reward = WeightedSum([LinearReward([1.0, 0.0]), LinearReward([0.0, 0.01])], [1.0, 3.0])
    ctx = make_ctx(reward)
    traj, metrics = GRPO(group_size=4, advantage_aggregation="per_reward").prepare(ctx, BATCH)
    terms = traj.extras["reward_terms"]
    assert set(terms) == set(term_weights(ctx.reward)) == {"linear_0", "linear_1"}
    expected, _ = per_reward_advantages(terms, {"linear_0": 1.0, "linear_1": 3.0}, traj.extras["group"])
    assert torch.allclose(traj.advantages, expected.clamp(-5, 5), atol=1e-5)
    summed, _ = group_advantages(traj.rewards.cpu(), traj.extras["group"])
    assert not torch.allclose(summed, expected, atol=1e-2)  # normalising the sum lets linear_0 win
    assert "zero_std_ratio/linear_1" in metrics
    with pytest.raises(ValueError, match="WeightedSum"):
        GRPO(group_size=2, advantage_aggregation="per_reward").prepare(make_ctx(), BATCH)
    with pytest.raises(ValueError, match="advantage_aggregation"):
        GRPO(advantage_aggregation="gdpo")


# -- reward backprop -------------------------------------------------------------------------------
def test_backprop_methods_refuse_a_non_differentiable_reward():
    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2)
    for algo in (DRaFT(), AlignProp(), ReFL()):
        with pytest.raises(ValueError, match="not differentiable"):
            AlignmentModule(policy, algo, ConstantReward())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_draft_k_backpropagates_through_exactly_the_last_k_calls(k):
    ctx = make_ctx(steps=4)
    rec = CallRecorder(ctx.policy.backbone)
    algo = DRaFT(k=k)
    data, _ = algo.prepare(ctx, BATCH)
    out = algo(ctx.policy, data)
    assert [g for _, g in rec.calls] == [False] * (4 - k) + [True] * k
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.policy.backbone.parameters())
    assert out["loss"].item() == pytest.approx(-out["reward_mean"].item(), rel=1e-5)


def test_draft_lv_averages_n_one_step_gradients():
    ctx = make_ctx(steps=4)
    rec = CallRecorder(ctx.policy.backbone)
    algo = DRaFT(lv_samples=5)
    data, _ = algo.prepare(ctx, BATCH)
    out = algo(ctx.policy, data)
    assert rec.calls == [(4, False)] * 4 + [(20, True)]
    assert ctx.reward.queries == 20
    out["loss"].backward()
    assert next(ctx.policy.backbone.parameters()).grad.abs().sum() > 0


def test_alignprop_draws_the_truncation_within_its_range():
    ctx = make_ctx(steps=6)
    algo = AlignProp(k_min=2, k_max=4)
    ks = {algo.grad_steps(ctx.policy, ctx.generator) for _ in range(200)}
    assert ks == {2, 3, 4}
    with pytest.raises(ValueError):
        AlignProp(k_min=3, k_max=2)


def test_refl_makes_one_differentiable_call_at_a_late_step():
    ctx = make_ctx(steps=8)
    rec = CallRecorder(ctx.policy.backbone)
    algo = ReFL(min_step_fraction=0.5, max_step_fraction=1.0, hinge=1000.0)
    data, _ = algo.prepare(ctx, BATCH)
    out = algo(ctx.policy, data)
    assert [g for _, g in rec.calls] == [False] * 8 + [True]
    assert 4 <= out["step_index"].item() <= 7
    assert out["loss"].item() == pytest.approx(1000.0 - out["reward_mean"].item(), rel=1e-5)


# -- reward-weighted likelihood ----------------------------------------------------------------------
def test_rwr_weights_have_mean_one_and_follow_the_reward():
    w = reward_weights(torch.tensor([0.0, 1.0, 2.0, 3.0]), temperature=1.0)
    assert w.mean().item() == pytest.approx(1.0) and (w.diff() > 0).all()
    assert reward_weights(torch.tensor([0.0, 1.0]), 1e-3)[1].item() == pytest.approx(2.0)


def test_rwr_prepare_weights_every_own_sample():
    ctx = make_ctx()
    data, metrics = RWR(temperature=0.5, num_updates=2).prepare(ctx, BATCH)
    assert len(data) == 2 and data[0].weight.shape == (4,) and 1.0 <= metrics["effective_samples"] <= 4.0


def test_raft_trains_only_on_the_best_sample_of_each_condition():
    assert select_top(
        torch.tensor([1.0, 5.0, 3.0, 0.0, -1.0, 2.0]), torch.tensor([0, 0, 0, 1, 1, 1]), 1
    ).tolist() == [1, 5]
    ctx = make_ctx()
    data, metrics = RAFT(samples_per_condition=4, keep_top=1).prepare(ctx, BATCH)
    winners = data[0].x0
    assert winners.shape == (4, 2)
    assert metrics["reward_selected_mean"] >= metrics["reward_mean"]
    # LinearReward = x.sum(): each winner must be the best of its condition's 4 samples
    assert torch.allclose(winners.sum(-1).mean(), torch.tensor(metrics["reward_selected_mean"]), atol=1e-5)
    assert (data[0].cond["label"] == torch.tensor([0, 1, 2, 3])).all()


# -- end to end ------------------------------------------------------------------------------------
E2E = {  # recipe: (epochs, minimum gain)
    "dpok_mode": (20, 0.3),
    "grpo_mode": (15, 0.3),
    "grpo_flow_mode": (15, 0.3),
    "draft_mode": (10, 0.3),
    "draft_lv_mode": (10, 0.3),
    "alignprop_mode": (10, 0.3),
    "refl_mode": (10, 0.3),
    "rwr_mode": (20, 0.1),
    "raft_mode": (15, 0.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_toy_recipe_raises_the_reward_beyond_seed_noise(name, tmp_path):
    epochs, min_gain = E2E[name]
    gain, stderr, s = toy_recipe_gain(name, tmp_path, epochs)
    assert gain > min_gain and gain > 10 * stderr, s
