"""Test-time methods: exact selection, unbiased resampling, uphill guidance, DNO, NFE, `diffalign sample`."""

import json

import pytest
import torch

from diffalign.core.guidance import (
    SVDD,
    BestOfN,
    DirectNoiseOptimization,
    FKSteering,
    PlainSampling,
    RewardGuidance,
    RewardGuidanceHook,
    effective_sample_size,
    multinomial_resample,
    noise_regulariser,
)
from diffalign.core.kernels import DDIMKernel, DDPMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy, RolloutState
from diffalign.core.testing import LinearReward, ToyBackbone
from diffalign.modalities.toy import MixtureBackbone
from diffalign.rewards.toy import TargetRegion
from tests.helpers import REPO


def toy_policy(steps=10, guidance_scale=1.0):
    return DiffusionPolicy(MixtureBackbone(), DDIMKernel(1.0), num_steps=steps, guidance_scale=guidance_scale)


def cond_for(n_per_class):
    return {"label": torch.arange(4).repeat(n_per_class)}


def test_nfe_counts_denoiser_rows_per_output():
    reward = TargetRegion()
    assert PlainSampling()(toy_policy(6), cond_for(2), reward).nfe_per_sample == 6
    assert BestOfN(3)(toy_policy(6), cond_for(2), reward).nfe_per_sample == 18
    assert PlainSampling()(toy_policy(6, guidance_scale=2.0), cond_for(2), reward).nfe_per_sample == 12


def test_best_of_n_returns_the_argmax_candidate():
    res = BestOfN(5)(toy_policy(), cond_for(4), TargetRegion(), torch.Generator().manual_seed(0))
    best = res.extras["candidate_scores"].max(dim=1).values
    assert torch.allclose(res.scores, best, atol=1e-6)


def test_resampling_keeps_the_count_and_favours_high_weights():
    g = torch.Generator().manual_seed(0)
    idx = multinomial_resample(torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), g)
    assert idx.shape == (2, 4) and (idx[0] == 2).all()
    draws = multinomial_resample(torch.tensor([[1.0, 3.0]]).expand(5000, 2).contiguous(), g)
    assert abs((draws == 1).float().mean().item() - 0.75) < 0.02
    assert torch.allclose(
        effective_sample_size(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])),
        torch.tensor([4.0, 1.0]),
    )


@pytest.mark.parametrize("ess", [0.5, None])
def test_fk_with_lambda_zero_leaves_the_base_distribution_unchanged(ess):
    policy, reward = toy_policy(8), TargetRegion()
    n = 400
    base = PlainSampling()(policy, cond_for(n), reward, torch.Generator().manual_seed(1)).x0
    fk = FKSteering(num_particles=4, lam=0.0, ess_threshold=ess, final="sample")
    steered = fk(policy, cond_for(n), reward, torch.Generator().manual_seed(2)).x0
    labels = torch.arange(4).repeat(n)
    for k in range(4):
        a, b = base[labels == k], steered[labels == k]
        # means of 400 draws with std ~0.3 differ by ~0.02 by chance; 0.08 is four standard errors
        assert torch.allclose(a.mean(0), b.mean(0), atol=0.08), (k, a.mean(0), b.mean(0))
        assert torch.allclose(a.std(0), b.std(0), atol=0.06), (k, a.std(0), b.std(0))


def test_fk_with_a_positive_lambda_raises_the_reward():
    policy, reward = toy_policy(), TargetRegion()
    base = PlainSampling()(policy, cond_for(64), reward, torch.Generator().manual_seed(0)).scores.mean()
    fk = FKSteering(num_particles=8, lam=20.0, final="sample")(
        policy, cond_for(64), reward, torch.Generator().manual_seed(0)
    )
    assert fk.scores.mean() > base + 0.05 and fk.extras["resampled_groups"] > 0


@pytest.mark.parametrize(
    "prediction_type,kernel",
    [
        ("epsilon", DDIMKernel()),
        ("v_prediction", DDPMKernel()),
        ("sample", DDIMKernel()),
        ("flow", FlowSDEKernel()),
    ],
)
def test_shift_pred_x0_moves_the_prediction_by_exactly_delta(prediction_type, kernel):
    policy = DiffusionPolicy(
        ToyBackbone(hidden=8, depth=1, prediction_type=prediction_type), kernel, num_steps=5
    )
    x, out, delta = torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 2)
    t = policy.kernel.set_timesteps(5)[1].expand(6)
    before = policy.kernel.pred_x0(out, t, x)
    after = policy.kernel.pred_x0(policy.kernel.shift_pred_x0(out, t, x, delta), t, x)
    assert torch.allclose(after, before + delta, atol=1e-4)


def test_guidance_moves_the_predicted_x0_uphill_on_a_linear_reward():
    policy, reward = toy_policy(), LinearReward(weight=[1.0, 2.0])
    cond = policy.backbone.condition({"prompt": [0, 1, 2, 3]})
    x = torch.randn(4, 2)
    t = policy.kernel.set_timesteps(10)[3].expand(4)
    out = policy.model_output(x, t, cond)
    state = RolloutState(index=3, t=t, x_t=x, cond=cond, mask=None, model_output=out.clone())
    RewardGuidanceHook(reward, scale=0.1).before_step(policy, state)
    r_before = reward(policy.kernel.pred_x0(out, t, x)).scores
    r_after = reward(policy.kernel.pred_x0(state.model_output, t, x)).scores
    assert (r_after > r_before + 1e-3).all()
    res = RewardGuidance(scale=0.5)(policy, cond_for(32), TargetRegion(), torch.Generator().manual_seed(0))
    base = PlainSampling()(policy, cond_for(32), TargetRegion(), torch.Generator().manual_seed(0))
    assert res.scores.mean() > base.scores.mean() + 0.05 and res.nfe_per_sample == 20


def test_guidance_refuses_a_non_differentiable_reward():
    from diffalign.core.testing import ConstantReward

    with pytest.raises(ValueError, match="differentiable"):
        RewardGuidanceHook(ConstantReward(), scale=1.0)


def test_svdd_with_one_candidate_is_the_base_sampler_and_more_candidates_raise_the_reward():
    policy, reward = toy_policy(), TargetRegion()
    plain = PlainSampling()(policy, cond_for(16), reward, torch.Generator().manual_seed(3))
    one = SVDD(candidates=1)(policy, cond_for(16), reward, torch.Generator().manual_seed(3))
    assert torch.equal(plain.x0, one.x0)
    many = SVDD(candidates=6)(policy, cond_for(16), reward, torch.Generator().manual_seed(3))
    assert many.scores.mean() > plain.scores.mean() + 0.1


def test_noise_regulariser_is_small_for_gaussian_noise_and_large_off_the_typical_set():
    z = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    typical = noise_regulariser(z)  # about 1 per block of 64 for N(0, I) noise
    assert 0.5 * 64 < typical.mean() < 2 * 64
    assert noise_regulariser(z * 2).min() > 20 * typical.max()
    assert noise_regulariser(z + 0.5).min() > 5 * typical.max()


def test_dno_raises_the_reward_and_the_regulariser_keeps_the_noise_typical():
    policy = toy_policy(steps=6)
    reward = LinearReward(weight=[1.0, 1.0])  # unbounded: without a regulariser the noise runs away
    runs = {}
    for reg in (0.0, 1.0):
        dno = DirectNoiseOptimization(steps=30, lr=0.2, reg_weight=reg, block_size=14)
        res = dno(policy, cond_for(16), reward, torch.Generator().manual_seed(0))
        flat = torch.cat([res.extras["x_T"].reshape(64, -1), res.extras["noises"].reshape(64, -1)], dim=1)
        runs[reg] = (res, flat, dno.history)
    for _, _, hist in runs.values():
        assert hist[-1] > hist[0] + 0.5
    free, kept = runs[0.0][1], runs[1.0][1]
    assert kept.mean().abs() < 0.5 * free.mean().abs()
    assert abs(kept.var().item() - 1) < 0.5


def test_sample_command_writes_results_and_loads_an_aligned_checkpoint(tmp_path):
    from diffalign.core.cli import cli_main
    from tests.helpers import run_fit, summary

    recipe = str(REPO / "recipes/toy/sample_plain.yaml")
    assert (
        cli_main(["sample", "--config", recipe, "--output", str(tmp_path / "base"), "--progress", "false"])
        == 0
    )
    base = json.loads((tmp_path / "base" / "results.json").read_text())
    assert base["samples"] == 64 and len(base["rows"]) == 64 and base["nfe_per_sample"] == 10
    assert torch.load(tmp_path / "base" / "samples.pt")["x0"].shape == (64, 2)
    run = run_fit(
        "recipes/toy/ddpo_mode.yaml",
        tmp_path / "runs",
        "--trainer.max_epochs=10",
        "--data.init_args.eval_seeds_per_prompt=4",
    )
    assert summary(run)["reward_after"] > summary(run)["reward_before"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert (
        cli_main(
            [
                "sample",
                "--config",
                recipe,
                "--output",
                str(tmp_path / "aligned"),
                "--ckpt_path",
                ckpt,
                "--progress",
                "false",
            ]
        )
        == 0
    )
    aligned = json.loads((tmp_path / "aligned" / "results.json").read_text())
    assert aligned["reward_mean"] > base["reward_mean"] + 0.2


def test_sample_command_names_a_bad_key(tmp_path, capsys):
    from diffalign.core.cli import cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes/toy/sample_fk.yaml").read_text().replace("num_particles", "num_particle"))
    assert cli_main(["sample", "--config", str(bad)]) == 2
    assert "num_particle" in capsys.readouterr().err


def test_fk_final_sample_targets_the_tilted_distribution_with_adaptive_resampling():
    """With λ > 0 and final='sample', FK approximates p_base·exp(λ r): its mean reward moves from the base
    mean toward the tilted mean E[r e^{λr}]/E[e^{λr}], whether or not resampling is adaptive."""
    policy, reward = toy_policy(8), TargetRegion()
    n = 1000
    base = PlainSampling()(policy, cond_for(n), reward, torch.Generator().manual_seed(5)).scores
    lam = 5.0
    w = torch.exp(lam * base)
    tilted = float((base * w).sum() / w.sum())
    for ess in (None, 0.5):
        fk = FKSteering(num_particles=8, lam=lam, final="sample", ess_threshold=ess)
        got = fk(policy, cond_for(n // 4), reward, torch.Generator().manual_seed(6)).scores.mean().item()
        assert got > base.mean().item() + 0.5 * (tilted - base.mean().item()), (ess, got, tilted)


def test_dno_refuses_a_non_differentiable_reward():
    from diffalign.core.testing import ConstantReward

    with pytest.raises(ValueError, match="not differentiable"):
        DirectNoiseOptimization(steps=1)(toy_policy(4), cond_for(1), ConstantReward())
