"""DDP on CPU with the gloo backend and 2 processes, through `diffalign fit` as a user runs it.

- one optimiser step on 2 ranks × B/2 gives the parameters of 1 rank × B (DDPO, GRPO, Diffusion-DPO,
  AlignProp, DiffusionNFT, AWM, GRPO-Guard and SDE-window GRPO on the toy; SGD, so a gradient twice too
  large or advantages normalised per rank show);
- the ranks sample different rows (seeds and initial noise), and together the global batch of 1 rank;
- evaluation covers the fixed set once, split over the ranks, and rank 0 writes one run folder;
- a 2-rank run killed with SIGKILL and resumed ends as an uninterrupted 2-rank run.

Every run has a timeout (ranks.py kills a run that hangs), and the module one more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.common import DDP, explain, fit, last_weights, records, run_ranks
from tests.helpers import write_toy_feedback

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RUN_TIMEOUT = 240  # seconds per run of a few toy steps (a busy 2-core machine); a hang fails
SGD = "model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.SGD\n      init_args: {lr: 0.05}\n"
# recipe, global batch (conditions or preference pairs), what the recipe records
ALGORITHMS = {
    "ddpo": ("toy/ddpo_mode.yaml", 16),
    "grpo": ("toy/grpo_mode.yaml", 4),  # × group_size 8 rollouts
    "dpo": ("toy/dpo_target.yaml", 8),
    "alignprop": ("toy/alignprop_mode.yaml", 16),
    # the forward-process methods (training timesteps and noise drawn for the global batch) and the GRPO
    # variants (stored step means; an SDE window), each 4 conditions × group_size 8
    "nft": ("toy/nft_mode.yaml", 4),
    "awm": ("toy/awm_mode.yaml", 4),
    "grpo_guard": ("toy/grpo_guard_mode.yaml", 4),
    "grpo_window": ("toy/grpo_window_mode.yaml", 4),
}
ONE_STEP = ["--trainer.max_epochs=1", "--data.init_args.eval_seeds_per_prompt=1"]
VOLATILE = {"wall_seconds", "run_dir"}


COUNT_SYNCS = ['--trainer.strategy={"class_path": "tests.distributed.strategies.CountingDDPStrategy"}']


def _one_step(recipe: str, batch: int, world: int, root: Path, sgd: Path) -> dict:
    per_rank = batch // world
    argv = fit(
        recipe,
        root,
        "--config",
        str(sgd),
        *ONE_STEP,
        f"--data.init_args.batch_size={per_rank}",
        f"--data.init_args.batches_per_epoch={world}",  # one global batch of `batch` in both cases
        *(DDP + COUNT_SYNCS if world > 1 else []),
    )
    return {"argv": argv, "world": world, "timeout": RUN_TIMEOUT, "record": True}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """For each algorithm: one optimiser step with 1 rank and with 2 ranks (results in that order)."""
    cwd = tmp_path_factory.mktemp("one_step")
    write_toy_feedback(cwd)
    sgd = cwd / "sgd.yaml"
    sgd.write_text(SGD)
    runs = []
    for name, (recipe, batch) in ALGORITHMS.items():
        runs += [_one_step(recipe, batch, w, cwd / f"{name}_{w}", sgd) for w in (1, 2)]
    results = run_ranks(cwd, runs)
    out = {}
    for i, name in enumerate(ALGORITHMS):
        out[name] = [dict(results[2 * i], index=2 * i), dict(results[2 * i + 1], index=2 * i + 1)]
    return cwd, out


def _run_folder(root: Path) -> Path:
    (name,) = [p for p in root.iterdir() if p.is_dir()]
    folders = sorted(p.name for p in name.iterdir())
    assert folders == ["version_0"], folders  # rank 1 claimed no run folder of its own
    return name / "version_0"


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_one_step_on_two_ranks_equals_one_rank_with_the_whole_batch(one_step, name):
    cwd, results = one_step
    single, double = results[name]
    for r in (single, double):
        assert r["codes"] == [0] * len(r["codes"]) and not r["timed_out"], explain(r)
    a = last_weights(_run_folder(cwd / f"{name}_1"))
    b = last_weights(_run_folder(cwd / f"{name}_2"))
    from diffalign.modalities.toy import MixtureBackbone

    base = {f"policy.backbone.{k}": v for k, v in MixtureBackbone().state_dict().items()}
    moved = max(float((a[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3, f"{name}: the step barely moved the weights ({moved:.2e}); the test would be blind"
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"{name}: 2 ranks differ from 1 rank by {worst:.2e} (the step moved {moved:.2e})"


@pytest.mark.parametrize("name", ["ddpo", "grpo", "nft", "grpo_window"])
def test_ranks_sample_their_own_rows_of_the_global_batch(one_step, name):
    cwd, results = one_step
    single, double = results[name]
    (one,) = (r["rollouts"] for r in records(cwd, single["index"], 1))
    r0, r1 = (r["rollouts"] for r in records(cwd, double["index"], 2))
    assert len(r0) == len(r1) == len(one) == 1  # one rollout batch each
    s0, s1 = r0[0]["seeds"], r1[0]["seeds"]
    assert not set(s0) & set(s1), "two ranks drew the same rollout seeds"
    assert not torch.allclose(r0[0]["x_T"], r1[0]["x_T"]), "two ranks drew the same initial noise"
    # together they sampled exactly the global batch one process samples
    assert s0 + s1 == one[0]["seeds"]
    assert torch.equal(torch.cat([r0[0]["x_T"], r1[0]["x_T"]]), one[0]["x_T"])


def test_gradients_are_all_reduced_once_per_optimiser_step(one_step):
    cwd, results = one_step
    # DDPO: 10 micro-batches (one per denoising step) accumulate into the one optimiser step; GRPO the same
    for name in ALGORITHMS:
        syncs = [r["all_reduces"] for r in records(cwd, results[name][1]["index"], 2)]
        assert syncs == [1, 1], f"{name}: {syncs} gradient all-reduces for one optimiser step"


def test_evaluation_covers_the_fixed_set_once_over_the_ranks(one_step):
    cwd, _ = one_step
    one = json.loads((_run_folder(cwd / "ddpo_1") / "summary.json").read_text())
    two = json.loads((_run_folder(cwd / "ddpo_2") / "summary.json").read_text())
    assert one["eval_samples"] == two["eval_samples"] == 4  # 4 prompts × 1 seed, not 4 per rank
    assert two["reward_before"] == pytest.approx(one["reward_before"], abs=1e-6)
    assert two["reward_before_per_prompt"] == pytest.approx(one["reward_before_per_prompt"], abs=1e-6)
    assert two["reward_queries"] == one["reward_queries"] == 16  # counted over both ranks
    assert two["reward_after"] == pytest.approx(one["reward_after"], abs=1e-4)


def test_two_rank_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    tiny = [
        "--trainer.max_epochs=3",
        "--data.init_args.batch_size=8",
        "--data.init_args.batches_per_epoch=4",  # 2 global steps of 2 × 8 per epoch
        "--data.init_args.eval_seeds_per_prompt=2",
        "--model.init_args.algorithm.init_args.train_batch_size=4",  # 2 updates per step
        *DDP,
    ]
    kill = [
        "--trainer.callbacks+=diffalign.core.testing.SignalAt",
        "--trainer.callbacks.init_args.epoch=2",
        "--trainer.callbacks.init_args.batch=0",
    ]
    last = str(tmp_path / "killed" / "ddpo_mode" / "version_0" / "checkpoints" / "last.ckpt")
    runs = [
        {"argv": fit("toy/ddpo_mode.yaml", tmp_path / "clean", *tiny), "world": 2},
        {"argv": fit("toy/ddpo_mode.yaml", tmp_path / "killed", *tiny, *kill), "world": 2},
        {"argv": fit("toy/ddpo_mode.yaml", tmp_path / "killed", *tiny, "--ckpt_path", last), "world": 2},
    ]
    for r in runs:
        r["timeout"] = RUN_TIMEOUT
    clean, killed, resumed = run_ranks(tmp_path, runs)
    assert clean["codes"] == [0, 0] and not clean["timed_out"], explain(clean)
    assert -9 in killed["codes"] and not killed["timed_out"], explain(killed)
    assert resumed["codes"] == [0, 0] and not resumed["timed_out"], explain(resumed)
    a, b = _run_folder(tmp_path / "clean"), _run_folder(tmp_path / "killed")

    def summary(run: Path) -> dict:
        return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in VOLATILE}

    assert summary(b) == summary(a)
    assert summary(a)["global_step"] == 3 * 2 * 2 and summary(a)["eval_samples"] == 8
    assert (b / "metrics.csv").read_text() == (a / "metrics.csv").read_text()
    wa, wb = last_weights(a), last_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
