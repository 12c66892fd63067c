"""Reward modelling: Bradley–Terry and Plackett–Luce losses, and a toy reward model that learns the reward."""

import math

import pytest
import torch

from diffalign.core.reward_model import LearnedReward, bradley_terry_loss, plackett_luce_loss
from diffalign.rewards.toy import PointScorer, TargetRegion
from tests.helpers import run_fit


def test_bradley_terry_and_plackett_luce_analytic_values():
    s = torch.tensor([0.0, 1.0])
    assert bradley_terry_loss(s, s).tolist() == pytest.approx([math.log(2)] * 2)
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))[0].item() == pytest.approx(
        math.log(1 + math.exp(-2))
    )
    # a tie label is symmetric: swapping the pair changes nothing
    tie = torch.tensor([0.5])
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), tie).item() == pytest.approx(
        bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1.0]), tie).item()
    )
    # Plackett–Luce with two items is Bradley–Terry
    pair = torch.tensor([[1.5, -0.5]])
    assert plackett_luce_loss(pair).item() == pytest.approx(
        bradley_terry_loss(pair[:, 0], pair[:, 1]).item(), rel=1e-6
    )
    # K items, equal scores: Σ log(K − k) over positions
    assert plackett_luce_loss(torch.zeros(1, 4)).item() == pytest.approx(math.log(4 * 3 * 2))
    scores = torch.zeros(1, 3, requires_grad=True)
    plackett_luce_loss(scores).sum().backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 2]  # the best item is pushed up, the worst down


@pytest.mark.slow
def test_toy_reward_model_learns_the_preference(cleandir):
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.toy import MixtureBackbone

    policy = DiffusionPolicy(MixtureBackbone(), num_steps=5)
    make_preference_dataset(
        policy,
        TargetRegion(),
        list(range(4)) * 32,
        cleandir / "feedback" / "feedback_target",
        samples_per_prompt=8,
        pairs_per_prompt=2,
    )
    run = run_fit("recipes/toy/reward_model_bt.yaml", cleandir / "runs", "--trainer.max_epochs=15")
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_acc = [
        float(r.split(",")[header.index("val/pair_accuracy")])
        for r in rows[1:]
        if r.split(",")[header.index("val/pair_accuracy")]
    ]
    assert val_acc[-1] > 0.9, val_acc
    learned = LearnedReward(PointScorer(hidden=32), str(cleandir / "reward_models" / "toy_bt.safetensors"))
    pts = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * 2
    a, b = learned(pts, {}).scores, TargetRegion()(pts, {}).scores
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()
    assert spearman > 0.8, spearman
