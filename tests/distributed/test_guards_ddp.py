"""The reward-hacking guards under DDP (gloo, 2 processes): the same guard values as one process.

The evaluation set (9 pairs: 3 conditions × 3 seeds, evaluated 2 at a time) is split 5 + 4 over two
ranks, the second shard padded with a repeat of the last pair. The guards (diversity and Vendi within a
prompt, a gold reward, the KL to the reference) must be measured over the whole set, each pair once,
on every rank; the periodic evaluation after the first step warns (max_kl: 0) and `early_stop` must
stop both ranks at that step (a decision taken on one rank only would hang the other).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.distributed.common import DDP, explain, fit, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GUARDS = """
trainer:
  callbacks:
    - class_path: diffalign.core.callbacks.RewardEvaluation
      init_args:
        batch_size: 2
        gold_reward:
          class_path: diffalign.rewards.toy.TargetRegion
          init_args: {center: [1.0, 1.0], radius: 1.0}
        guard_every_n_steps: 1
        max_kl: 0.0
        early_stop: true
"""
SGD = "model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.SGD\n      init_args: {lr: 0.05}\n"
MEASURED = ("diversity", "vendi", "vendi_bandwidth", "gold_mean", "gold_failed", "kl_to_reference")


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> list[dict]:
    cwd = tmp_path_factory.mktemp("guards")
    (cwd / "guards.yaml").write_text(GUARDS)
    (cwd / "sgd.yaml").write_text(SGD)
    runs = []
    for world in (1, 2):
        argv = fit(
            "toy/ddpo_mode.yaml",
            cwd / f"w{world}",
            "--config",
            str(cwd / "guards.yaml"),
            "--config",
            str(cwd / "sgd.yaml"),
            "--trainer.max_epochs=1",
            f"--data.init_args.batch_size={8 // world}",
            f"--data.init_args.batches_per_epoch={3 * world}",  # 3 global batches of 8, if not stopped
            "--data.init_args.eval_prompts=[0, 1, 2]",
            "--data.init_args.eval_seeds_per_prompt=3",
            *(DDP if world > 1 else []),
        )
        runs.append({"argv": argv, "world": world, "timeout": 240})
    out = []
    for world, r in zip((1, 2), run_ranks(cwd, runs), strict=True):
        assert r["codes"] == [0] * world and not r["timed_out"], explain(r)
        (summary,) = (cwd / f"w{world}").glob("*/version_0/summary.json")
        out.append(json.loads(summary.read_text()))
    return out


def _same(a: dict, b: dict, what: str) -> None:
    for key in MEASURED:
        assert key in a, f"{what}: {key} was not measured: {a}"
        x, y = a[key], b.get(key)
        assert isinstance(y, (int, float)) and math.isfinite(y), f"{what}: {key} = {y} on 2 ranks"
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6), f"{what}: {key} {x} on 1 rank, {y} on 2 ranks"


def test_guards_on_two_ranks_measure_the_whole_set_as_one_rank(summaries):
    one, two = summaries
    assert one["eval_samples"] == two["eval_samples"] == 9
    _same(one["guards"]["before"], two["guards"]["before"], "before training")
    _same(one["guards"]["after"], two["guards"]["after"], "after training")
    assert one["guards"]["before"]["diversity_prompts"] == two["guards"]["before"]["diversity_prompts"] == 3
    assert two["guards"]["before"]["kl_to_reference"] == 0.0  # the reference is the start
    assert two["guards"]["after"]["kl_to_reference"] > 0  # the step moved the policy
    assert [h["step"] for h in two["guards"]["history"]] == [h["step"] for h in one["guards"]["history"]]
    for h1, h2 in zip(one["guards"]["history"], two["guards"]["history"], strict=True):
        _same(h1, h2, f"periodic evaluation at step {h1['step']}")


def test_early_stop_is_decided_on_every_rank_alike(summaries):
    one, two = summaries
    # the evaluation after step 1 warns (KL > max_kl = 0): both runs stop there instead of taking 3 steps
    assert (
        [w["step"] for w in one["guards"]["warnings"]]
        == [w["step"] for w in two["guards"]["warnings"]]
        == [1]
    )
    assert one["global_step"] == two["global_step"] == 1
