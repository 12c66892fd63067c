"""Reward-hacking guards: diversity and Vendi analytics, the path KL, the warning rule, RewardEvaluation's
summary and plot; a collapse triggers the warning and a healthy run does not (toy, fast; digits, slow)."""

import json
import math

import pytest
import torch

from diffalign.core.algorithms import DDPO, ReFL
from diffalign.core.callbacks import RewardEvaluation
from diffalign.core.data import PromptDataModule
from diffalign.core.guards import (
    GuardRule,
    mean_pairwise_distance,
    median_within_prompt_distance,
    path_kl,
    prompt_diversity,
    vendi_score,
)
from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.module import AlignmentModule
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import ToyBackbone
from diffalign.modalities.toy import MixtureBackbone
from diffalign.rewards.toy import TargetRegion
from tests.helpers import quiet_trainer


# -- diversity -------------------------------------------------------------------------------------
def test_mean_pairwise_distance_and_vendi_score_analytic_cases():
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert mean_pairwise_distance(pts) == pytest.approx((3 + 4 + 5) / 3)
    assert math.isnan(mean_pairwise_distance(pts[:1]))
    for bw in (None, 0.3):  # cosine kernel, Gaussian kernel
        assert vendi_score(torch.ones(5, 3), bw) == pytest.approx(1.0)  # one sample repeated: one effective
        assert vendi_score(torch.eye(4), bw) == pytest.approx(4.0, rel=1e-3)  # all unlike
        two = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        assert vendi_score(two, bw) == pytest.approx(2.0, rel=1e-3)  # two kinds, twice each
        assert 1.0 < vendi_score(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), bw) <= 6.0
    # the Gaussian kernel sees scale: a cloud shrunk 10x is less diverse at a fixed bandwidth
    cloud = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    assert vendi_score(0.1 * cloud, 1.0) < vendi_score(cloud, 1.0)
    assert vendi_score(0.1 * cloud) == pytest.approx(vendi_score(cloud))  # the cosine kernel does not


def test_prompt_diversity_averages_within_prompts_only():
    f = torch.tensor([[0.0], [2.0], [10.0], [10.0], [50.0]])
    out = prompt_diversity(f, ["a", "a", "b", "b", "c"], bandwidth=1.0)  # "c" has one sample: left out
    assert out["diversity"] == pytest.approx((2.0 + 0.0) / 2) and out["diversity_prompts"] == 2
    assert out["vendi"] == pytest.approx((vendi_score(f[:2], 1.0) + 1.0) / 2)
    assert median_within_prompt_distance(f, ["a", "a", "b", "b", "c"]) == pytest.approx(1.0)  # of 2 and 0


# -- the KL to the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [DDIMKernel(1.0), FlowSDEKernel(0.7)], ids=["ddim", "flow_sde"])
def test_path_kl_is_zero_at_the_reference_and_the_sum_of_step_kls(kernel):
    pt = "flow" if isinstance(kernel, FlowSDEKernel) else "epsilon"
    torch.manual_seed(0)
    policy = DiffusionPolicy(ToyBackbone(hidden=16, depth=2, prediction_type=pt), kernel, num_steps=4)
    policy.backbone.freeze_reference()
    cond = policy.backbone.condition({"prompt": [0, 1, 2]})
    traj = policy.rollout(cond, torch.Generator().manual_seed(0))
    with policy.backbone.reference() as ref:
        kl, steps = path_kl(policy, traj, ref)
    assert torch.equal(kl, torch.zeros(3)) and steps >= 3
    with torch.no_grad():
        for p in policy.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with policy.backbone.reference() as ref:
        kl, _ = path_kl(policy, traj, ref)
        expected = torch.zeros(3)
        for j in range(4):
            a, b = policy.log_prob(traj, j), policy.log_prob(traj, j, backbone=ref)
            keep = a.std > 0
            d = torch.where(keep, (a.mean - b.mean) ** 2 / (2 * torch.where(keep, a.std, 1.0) ** 2), 0.0)
            expected += d.sum(1)
    torch.testing.assert_close(kl, expected)
    assert (kl > 0).all()


# -- the rule --------------------------------------------------------------------------------------
def test_guard_rule_warns_only_when_the_reward_rises_while_diversity_or_gold_fall():
    rule = GuardRule(diversity_drop=0.5, gold_drop=0.05, max_kl=100.0)
    start = {"mean": 0.5, "guards": {"diversity": 10.0, "vendi": 3.0, "gold_mean": 0.6}}
    fine = {"mean": 0.8, "guards": {"diversity": 7.0, "vendi": 2.5, "gold_mean": 0.62, "kl_to_reference": 5}}
    assert rule.check(start, fine) == []
    collapsed = {"mean": 0.99, "guards": {"diversity": 1.0, "vendi": 1.05, "gold_mean": 0.4}}
    msgs = rule.check(start, collapsed)
    assert len(msgs) == 3 and "diversity within a prompt fell 10 → 1" in msgs[0] and "gold" in msgs[2]
    # no rise of the reward: a drop in diversity alone is no sign of hacking
    assert rule.check(start, {**collapsed, "mean": 0.4}) == []
    # the KL ceiling warns on its own
    assert "KL" in rule.check(start, {"mean": 0.4, "guards": {"kl_to_reference": 500.0}})[0]
    with pytest.raises(ValueError):
        GuardRule(diversity_drop=1.5)


# -- RewardEvaluation --------------------------------------------------------------------------------
def fit_toy(algorithm, lr, epochs, tmp_path, guard_every=None, early_stop=False, gold=None):
    torch.manual_seed(0)
    policy = DiffusionPolicy(MixtureBackbone(), DDIMKernel(1.0), num_steps=10)
    module = AlignmentModule(
        policy, algorithm, TargetRegion(), optimizer=lambda p: torch.optim.Adam(p, lr=lr), seed=0
    )
    callback = RewardEvaluation(
        guard_every_n_steps=guard_every, early_stop=early_stop, gold_reward=gold, batch_size=256
    )
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=str(tmp_path), callbacks=[callback])
    data = PromptDataModule(
        prompts=[0, 1, 2, 3], batch_size=64, batches_per_epoch=4, eval_seeds_per_prompt=32
    )
    trainer.fit(module, data)
    return json.loads((tmp_path / "summary.json").read_text()), trainer


def test_a_collapse_onto_one_point_triggers_the_warning_and_early_stop(tmp_path):
    with pytest.warns(UserWarning, match="possible reward hacking"):
        s, trainer = fit_toy(ReFL(), lr=0.003, epochs=6, tmp_path=tmp_path, guard_every=4, early_stop=True)
    g = s["guards"]
    assert s["reward_after"] > s["reward_before"] + 0.3
    assert g["warnings"] and "diversity" in g["warnings"][0]["message"]
    assert g["after"]["diversity"] < 0.5 * g["before"]["diversity"]
    assert trainer.global_step < 24  # stopped at the first periodic warning, before the 6 epochs
    assert g["before"]["feature_space"] == "MixtureBackbone.features" and g["after"]["kl_to_reference"] > 0
    assert (tmp_path / "reward_curve.png").is_file()


def test_a_healthy_run_raises_no_warning_and_records_everything(tmp_path):
    s, _ = fit_toy(
        DDPO(advantages="batch"), lr=1e-3, epochs=2, tmp_path=tmp_path, gold=TargetRegion(radius=2.0)
    )
    g = s["guards"]
    assert s["reward_after"] > s["reward_before"] + 0.05 and g["warnings"] == []
    assert g["before"]["kl_to_reference"] == 0.0 or "kl_to_reference" not in g["before"]
    assert g["after"]["kl_to_reference"] > 0 and g["after"]["gold_mean"] > g["before"]["gold_mean"]
    assert [h["step"] for h in g["history"]] == [0, 8]
    assert 1.0 <= g["after"]["vendi"] <= 32


def test_guards_can_be_switched_off(tmp_path):
    torch.manual_seed(0)
    policy = DiffusionPolicy(MixtureBackbone(), DDIMKernel(1.0), num_steps=4)
    module = AlignmentModule(policy, DDPO(advantages="batch"), TargetRegion(), seed=0)
    trainer = quiet_trainer(
        max_epochs=1, default_root_dir=str(tmp_path), callbacks=[RewardEvaluation(guards=False)]
    )
    trainer.fit(module, PromptDataModule(prompts=[0, 1], batch_size=8, eval_seeds_per_prompt=4))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "guards" not in s and not policy.backbone._reference_copy  # no reference kept for a KL


# -- digits: the reward-backprop collapse of docs/algorithms/index.md ----------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~3 CPU-minutes; the default 600 s wall is too short on a shared 2-core machine
def test_digit_collapse_triggers_the_guard_and_healthy_ddpo_does_not(tmp_path):
    """ReFL at lr 1e-3 collapses every seed of a prompt onto one blob; DDPO at the quick start's settings
    raises the same reward without a warning (short versions of both recipes, 12 updates each: as long as
    the 768-query DDPO row of the frontier table in docs/algorithms/index.md, +0.15 without a warning)."""
    from tests.helpers import run_fit, summary

    guard = tmp_path / "guard.yaml"
    guard.write_text(
        "trainer:\n  callbacks:\n    - class_path: diffalign.core.callbacks.RewardEvaluation\n"
        "      init_args:\n"
        "        features: diffalign.modalities.image.features.digit_features\n"
        "        gold_reward: {class_path: diffalign.rewards.image.DigitRealism}\n"
    )
    tiny = ["--data.init_args.eval_seeds_per_prompt=6", "--trainer.enable_checkpointing=false"]
    refl = summary(
        run_fit(
            "recipes/image/refl_digit_fidelity.yaml",
            tmp_path / "refl",
            "--trainer.max_epochs=3",
            *tiny,
            extra_configs=(guard,),
        )
    )
    assert refl["reward_after"] > 0.9 and refl["guards"]["warnings"], refl["guards"]
    ddpo = summary(
        run_fit(
            "recipes/image/ddpo_digit_fidelity.yaml",
            tmp_path / "ddpo",
            "--trainer.max_epochs=3",
            *tiny,
            extra_configs=(guard,),
        )
    )
    assert ddpo["reward_after"] > ddpo["reward_before"] + 0.05 and ddpo["guards"]["warnings"] == [], ddpo[
        "guards"
    ]


# -- the modalities' feature spaces for the diversity guard ------------------------------------------
def test_shape_features_ignore_point_order_and_padding():
    """Flattened points would put one shape with its points permuted far away; the shape features do not."""
    from diffalign.modalities.shape3d import ShapeBackbone

    backbone = ShapeBackbone(weights=None)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(2, 40, 3, generator=g)
    mask = torch.ones(2, 40)
    feats = backbone.features({"points": points, "mask": mask})
    permuted = backbone.features({"points": points[:, torch.randperm(40, generator=g)], "mask": mask})
    assert feats.shape == (2, 64)
    torch.testing.assert_close(permuted, feats)
    padded = torch.cat([points[:1], torch.zeros(1, 10, 3)], dim=1)  # 10 padding rows
    pad_mask = torch.cat([mask[:1], torch.zeros(1, 10)], dim=1)
    torch.testing.assert_close(backbone.features({"points": padded, "mask": pad_mask}), feats[:1])
    assert torch.dist(feats[0], feats[1]) > 0.1  # two different clouds are apart


def test_audio_features_ignore_phase_but_separate_pitches():
    """Two takes of one note at shifted phase are near; another pitch is far (raw waveforms: both far)."""
    from diffalign.modalities.audio import WaveformBackbone
    from diffalign.modalities.audio.layout import AudioSamples

    backbone = WaveformBackbone(weights=None)
    t = torch.arange(backbone.max_samples) / backbone.sample_rate
    audio = 0.5 * torch.stack(
        [
            torch.sin(2 * math.pi * 262 * t),
            torch.sin(2 * math.pi * 262 * t + 1.0),
            torch.sin(2 * math.pi * 392 * t),
        ]
    )
    samples = AudioSamples(audio[:, None], backbone.sample_rate)
    d = torch.cdist(backbone.features(samples), backbone.features(samples))
    raw = torch.cdist(audio, audio)
    assert d[0, 1] < 0.1 * d[0, 2] and raw[0, 1] > 0.5 * raw[0, 2]
    shorter = AudioSamples(audio[:1, None], backbone.sample_rate, [backbone.max_samples // 2])
    assert torch.isfinite(backbone.features(shorter)).all()  # padding frames left out
