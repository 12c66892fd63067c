"""DDPO: the clipped surrogate analytically, its minibatching, and end-to-end reward improvement."""

import math

import pytest
import torch

from diffalign.core.algorithms import DDPO, AlignContext
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.policy_gradient import clipped_surrogate as ddpo_loss
from diffalign.core.reward import GuardedReward
from diffalign.core.testing import FlakyReward, LinearReward, ToyBackbone, fake_trajectory
from tests.helpers import run_fit, summary


def test_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    lp = torch.randn(4)
    out = ddpo_loss(lp, lp.clone(), adv, clip_range=1e-4)
    assert torch.isclose(out["loss"], -adv.mean())
    assert out["approx_kl"] == 0 and out["clipfrac"] == 0 and out["ratio_mean"] == 1


def test_loss_gradient_is_minus_advantage_at_ratio_one():
    adv = torch.tensor([1.0, -2.0])
    lp = torch.zeros(2, requires_grad=True)
    ddpo_loss(lp, torch.zeros(2), adv, 0.1)["loss"].backward()
    assert torch.allclose(lp.grad, -adv / 2)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    eps = 0.1
    # positive advantage and ratio above 1+eps: clipped term is larger, gradient zero
    lp = torch.tensor([math.log(1.5)], requires_grad=True)
    out = ddpo_loss(lp, torch.zeros(1), torch.tensor([1.0]), eps)
    out["loss"].backward()
    assert lp.grad.abs().item() == 0 and out["clipfrac"] == 1
    assert torch.isclose(out["loss"], torch.tensor(-1.1))
    # negative advantage and ratio above 1+eps: the unclipped (pessimistic) term keeps its gradient
    lp2 = torch.tensor([math.log(1.5)], requires_grad=True)
    out2 = ddpo_loss(lp2, torch.zeros(1), torch.tensor([-1.0]), eps)
    out2["loss"].backward()
    assert torch.isclose(out2["loss"], torch.tensor(1.5)) and lp2.grad.item() == pytest.approx(1.5)
    assert torch.isclose(out2["approx_kl"], torch.tensor(0.5 * math.log(1.5) ** 2))


@pytest.mark.parametrize("fraction,expected_steps", [(1.0, 6), (0.5, 3), (0.1, 1)])
def test_minibatches_cover_distinct_steps_per_sample(fraction, expected_steps):
    traj = fake_trajectory(batch=8, steps=6)
    algo = DDPO(
        timestep_fraction=fraction, train_batch_size=4, gradient_accumulation_steps=1, num_inner_epochs=2
    )
    updates = list(algo.minibatches(traj, torch.Generator().manual_seed(0)))
    assert len(updates) == 2 * 2  # 2 inner epochs x (8 samples / 4 per update)
    for micro in updates:
        assert len(micro) == expected_steps
        steps = torch.stack([m.step for m in micro], dim=1)  # (4, expected_steps)
        assert all(len(set(row.tolist())) == expected_steps for row in steps)


def test_prepare_scores_normalises_and_drops_bad_samples():
    torch.manual_seed(0)
    policy = DiffusionPolicy(ToyBackbone(hidden=16, depth=2), num_steps=3)
    reward = GuardedReward(FlakyReward(LinearReward(), nan_rows=[2]), on_invalid="drop")
    ctx = AlignContext(policy, reward, torch.Generator().manual_seed(0), torch.device("cpu"))
    algo = DDPO(advantages="batch", adv_clip_max=1.0)
    traj, metrics = algo.prepare(ctx, {"prompt": [0, 1, 2, 3, 0, 1]})
    assert len(traj) == 5 and metrics["reward_dropped"] == 1
    assert traj.advantages.abs().max() <= 1.0
    assert torch.allclose(traj.rewards, traj.x0.sum(-1))
    # the first update of a rollout is on-policy: every ratio is exactly 1
    for micro in next(iter(algo.minibatches(traj, torch.Generator()))):
        out = algo(policy, micro)
        assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_toy_recipe_raises_reward_far_beyond_seed_noise(tmp_path):
    run = run_fit("recipes/toy/ddpo_mode.yaml", tmp_path, "--trainer.max_epochs=15")
    s = summary(run)
    n = s["eval_samples"]
    stderr = s["reward_before_std"] / math.sqrt(n)
    gain = s["reward_after"] - s["reward_before"]
    assert n == 256 and s["reward_queries"] == 15 * 4 * 64
    assert gain > 0.3 and gain > 20 * stderr, s
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert (run / "reward_curve.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.ckpt").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/approx_kl", "train/clipfrac", "train/reward_mean", "train/reward_std", "train/loss"):
        assert key in header
