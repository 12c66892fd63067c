"""Rewards: combinators, function rewards, the NaN/raise guard and advantage normalisation."""

import pytest
import torch

from diffalign.core.advantages import PerPromptNormalizer, batch_advantages, row_keys
from diffalign.core.reward import FunctionReward, GuardedReward, RewardError, WeightedSum
from diffalign.core.testing import ConstantReward, FlakyReward, LinearReward
from diffalign.core.types import Cond


def test_weighted_sum_combines_and_logs_each_term():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    r = WeightedSum([LinearReward(), ConstantReward(2.0)], [0.5, -1.0])
    out = r(x, {})
    assert torch.allclose(out.scores, 0.5 * torch.tensor([3.0, -1.0]) - 2.0)
    assert set(out.info) == {"term/linear", "term/constant"}
    assert not r.differentiable
    assert WeightedSum([LinearReward(), LinearReward()]).differentiable
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedSum([LinearReward(), ConstantReward()], [1.0])


def test_function_reward_by_dotted_path():
    r = FunctionReward("diffalign.core.testing.squared_norm", kwargs={"scale": 2.0}, differentiable=True)
    assert r.name == "squared_norm"
    out = r(torch.tensor([[1.0, 1.0], [0.0, 3.0]]), {})
    assert torch.allclose(out.scores, torch.tensor([-4.0, -18.0]))
    with pytest.raises(ValueError, match="no_such_function"):
        FunctionReward("diffalign.core.testing.no_such_function")
    with pytest.raises(ValueError, match="dotted path"):
        FunctionReward("justaname")


def _cond(n):
    return {"row": torch.arange(n)}


def test_guard_raise_names_reward_and_sample_index_for_nan():
    g = GuardedReward(FlakyReward(LinearReward(), nan_rows=[3]), on_invalid="raise")
    with pytest.raises(RewardError, match=r"reward 'flaky'.*sample index 3.*nan"):
        g(torch.ones(5, 2), _cond(5), 5)


def test_guard_finds_the_raising_rows_one_by_one():
    g = GuardedReward(FlakyReward(LinearReward(), raise_rows=[1, 4]), on_invalid="drop")
    out = g(torch.ones(6, 2), _cond(6), 6)
    assert out.keep.tolist() == [True, False, True, True, False, True]
    assert set(out.reasons) == {1, 4} and "ValueError" in out.reasons[1]
    assert torch.allclose(out.scores[out.keep], torch.full((4,), 2.0))
    assert g.dropped == 2 and g.queries == 6
    with pytest.raises(RewardError, match="sample index 1"):
        GuardedReward(FlakyReward(LinearReward(), raise_rows=[1]))(torch.ones(3, 2), _cond(3), 3)


def test_guard_drop_counts_and_refuses_an_all_bad_batch():
    g = GuardedReward(FlakyReward(LinearReward(), nan_rows=[0, 2]), on_invalid="drop")
    out = g(torch.ones(4, 2), _cond(4), 4)
    assert out.num_dropped == 2 and out.keep.tolist() == [False, True, False, True]
    with pytest.raises(RewardError, match="every sample"):
        GuardedReward(FlakyReward(LinearReward(), nan_rows=[0, 1]), "drop")(torch.ones(2, 2), _cond(2), 2)


def test_guard_rejects_wrong_number_of_scores():
    class Short(ConstantReward):
        def forward(self, samples, cond):
            return super().forward(samples[:1], cond)

    with pytest.raises(RewardError, match=r"returned scores of shape \(1,\) for 3 samples"):
        GuardedReward(Short())(torch.ones(3, 2), {}, 3)


def test_per_prompt_normalizer_uses_per_key_stats_once_warm():
    norm = PerPromptNormalizer(buffer_size=8, min_count=2)
    keys = ["a", "a", "b", "b"]
    adv = norm(keys, torch.tensor([1.0, 3.0, 10.0, 30.0]))
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-4)
    state = norm.state_dict()
    other = PerPromptNormalizer(buffer_size=8, min_count=2)
    other.load_state_dict(state)
    assert other.buffers == norm.buffers


def test_per_prompt_normalizer_falls_back_to_batch_stats_when_cold():
    norm = PerPromptNormalizer(buffer_size=8, min_count=5)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(norm(["a", "b", "c", "d"], r), batch_advantages(r), atol=1e-4)


def test_buffer_keeps_only_the_last_rewards():
    norm = PerPromptNormalizer(buffer_size=3, min_count=1)
    norm(["a"] * 5, torch.arange(5.0))
    assert norm.buffers["a"] == [2.0, 3.0, 4.0]


def test_row_keys_group_equal_conditions():
    keys = row_keys(Cond({"label": torch.tensor([1, 2, 1])}))
    assert keys[0] == keys[2] != keys[1]
    # the prompts, when the rows have them, are the keys (dicts as sorted JSON)
    cond = Cond({"label": torch.tensor([1, 2]), "prompt": ["a 3", {"digit": 3, "dir": "left"}]})
    assert row_keys(cond) == ["a 3", '{"digit": 3, "dir": "left"}']


def test_evaluation_counts_failed_rewards_instead_of_crashing():
    from types import SimpleNamespace

    from diffalign.core.callbacks import evaluate_reward
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.testing import ToyBackbone

    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2)
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4)]
    good = evaluate_reward(SimpleNamespace(policy=policy, reward=LinearReward()), pairs)
    assert good["count"] == 4 and good["failed"] == 0
    flaky = FlakyReward(LinearReward(), nan_rows=[1])
    res = evaluate_reward(SimpleNamespace(policy=policy, reward=flaky), pairs)
    assert res["count"] == 3 and res["failed"] == 1
    broken = FlakyReward(LinearReward(), raise_rows=[0, 1, 2, 3])
    res = evaluate_reward(SimpleNamespace(policy=policy, reward=broken), pairs)
    assert res["count"] == 0 and res["failed"] == 4


def test_guard_retries_rows_of_a_batch_layout_with_pass_through_values():
    """A decoded layout that is a `Batch` (named rows plus a pass-through value, like an audio batch's
    sample rate) keeps its class and that value when the guard re-scores rows one by one."""
    from diffalign.core.reward import Reward, index_samples
    from diffalign.core.types import Batch

    class Layout(Batch):
        pass

    class FailsOnRowOne(Reward):
        def forward(self, samples, cond):
            assert isinstance(samples, Layout) and samples.rate == 8000
            if len(samples) > 1:
                raise ValueError("batch fails")
            if float(samples.x[0]) == 1.0:
                raise ValueError("row 1 fails")
            return samples.x.float()

    layout = Layout(x=torch.tensor([0.0, 1.0, 2.0]), rate=8000)
    assert isinstance(index_samples(layout, [2]), Layout) and index_samples(layout, [2]).rate == 8000
    out = GuardedReward(FailsOnRowOne(), on_invalid="drop")(layout, Cond.empty(3))
    assert out.keep.tolist() == [True, False, True] and out.scores[2] == 2.0
