"""One seeding rule: a (condition, seed) pair gives the same sample in every command and at any batch
size — `diffalign sample`, `diffalign predict`, the evaluation of a training run, `diffalign feedback`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign.core.callbacks import evaluate_reward
from diffalign.core.guidance import SVDD, BestOfN, FKSteering
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.sampling import sample_pairs, seed_pairs
from diffalign.modalities.toy import MixtureBackbone
from diffalign.rewards.toy import TargetRegion
from tests.helpers import QUIET, REPO

PAIRS = seed_pairs([0, 1, 2, 3], 2, 10_000)  # what the toy recipes' evaluation and sampling sets start with


def _policy() -> DiffusionPolicy:
    from diffalign.core.kernels import DDIMKernel

    return DiffusionPolicy(MixtureBackbone(), DDIMKernel(eta=1.0), num_steps=10)


@pytest.mark.parametrize("method", [None, BestOfN(n=3), FKSteering(num_particles=3), SVDD(candidates=3)],
                         ids=["plain", "best_of_n", "fk", "svdd"])  # fmt: skip
def test_a_pair_gives_the_same_sample_at_batch_sizes_1_and_8(method):
    policy, reward = _policy(), TargetRegion()
    one = torch.cat([b.x0 for b in sample_pairs(policy, PAIRS, 1, reward, method)])
    eight = torch.cat([b.x0 for b in sample_pairs(policy, PAIRS, 8, reward, method)])
    torch.testing.assert_close(one, eight, rtol=0, atol=1e-6)
    # and a pair's sample does not depend on the other pairs of its batch
    alone = next(iter(sample_pairs(policy, PAIRS[5:6], 1, reward, method))).x0
    torch.testing.assert_close(alone, eight[5:6], rtol=0, atol=1e-6)


def test_evaluation_does_not_depend_on_its_batch_size():
    policy, reward = _policy(), TargetRegion()
    module = SimpleNamespace(policy=policy, reward=reward)
    a, b = evaluate_reward(module, PAIRS, batch_size=1), evaluate_reward(module, PAIRS, batch_size=8)
    assert a["mean"] == pytest.approx(b["mean"], abs=1e-7) and a["per_prompt"] == pytest.approx(
        b["per_prompt"]
    )


@pytest.mark.slow
def test_sample_predict_and_fit_evaluation_agree_through_the_cli(cleandir):
    from diffalign.core.cli import cli_main

    recipe = str(REPO / "recipes" / "toy" / "sample_plain.yaml")
    outs = {}
    for bs in (1, 8):
        out = cleandir / f"sample_bs{bs}"
        args = ["sample", "--config", recipe, "--seeds_per_prompt", "2", "--batch_size", str(bs)]
        assert cli_main([*args, "--output", str(out), "--progress", "false"]) == 0
        outs[bs] = torch.load(out / "samples.pt")
    assert outs[1]["seeds"] == outs[8]["seeds"] == [s for _, s in PAIRS]
    torch.testing.assert_close(outs[1]["x0"], outs[8]["x0"], rtol=0, atol=1e-6)

    fit_recipe = str(REPO / "recipes" / "toy" / "ddpo_mode.yaml")
    common = [
        "--config",
        fit_recipe,
        "--data.init_args.eval_seeds_per_prompt",
        "2",
        "--run_root",
        "runs",
        *QUIET,
    ]
    cli = cli_main(["predict", *common])
    preds = torch.load(Path(cli.trainer.log_dir) / "predictions.pt", weights_only=False)
    seeds = [s for b in preds for s in b["seed"]]
    x0 = torch.cat([b["samples"] for b in preds])
    assert seeds == [s for _, s in PAIRS]
    torch.testing.assert_close(x0, outs[1]["x0"], rtol=0, atol=1e-6)

    # the evaluation a training run does before its first step scores the same samples
    cli = cli_main(["fit", *common, "--trainer.max_steps", "1", "--trainer.limit_train_batches", "1"])
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    rewards = json.loads((cleandir / "sample_bs1" / "results.json").read_text())["rows"]
    assert summary["reward_before"] == pytest.approx(
        sum(r["reward"] for r in rewards) / len(rewards), abs=1e-6
    )


def test_feedback_candidates_are_the_pairs_of_the_seeding_rule(tmp_path):
    from diffalign.core.feedback import make_preference_dataset

    policy, reward = _policy(), TargetRegion()
    make_preference_dataset(policy, reward, [0, 1], tmp_path, samples_per_prompt=4, batch_size=4)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    expected = {(p, s): b.x0[i] for b in sample_pairs(policy, seed_pairs([0, 1], 4, 0), 8) for i, (p, s) in
                enumerate(zip(b.cond.prompts, b.seeds, strict=True))}  # fmt: skip
    assert rows
    for row in rows:
        for side in ("winner", "loser"):
            i, j = (int(v) for v in Path(row[side]).stem.split("_"))  # prompt index, candidate
            saved = torch.load(tmp_path / row[side])
            torch.testing.assert_close(saved, expected[(row["prompt"], 1000 * i + j)], rtol=0, atol=1e-6)
