"""End to end: training-based alignment raises DigitFidelity of the shipped flow-matching digit model.

The fast members of the family (reward backpropagation and best-of-n distillation) on short budgets;
the gain must clear 3 standard errors of the before/after means over the fixed evaluation set. DDPO
itself needs ~48 updates (the quick start, `make demo`) and is measured by benchmarks/image_alignment.py.
"""

import math

import pytest

from tests.helpers import run_fit, summary


def _gain_and_se(s: dict) -> tuple[float, float]:
    n = s["eval_samples"]
    se = math.sqrt((s["reward_before_std"] ** 2 + s["reward_after_std"] ** 2) / n)
    return s["reward_after"] - s["reward_before"], se


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,overrides",
    [
        ("refl_digit_fidelity", ["--data.init_args.batch_size=32"]),  # 8 updates of 32 samples
        ("raft_digit_fidelity", ["--trainer.max_epochs=3"]),  # 12 rounds of best-of-8 for 8 prompts
    ],
)
def test_alignment_raises_digit_fidelity(recipe, overrides, cleandir):
    run = run_fit(
        f"recipes/image/{recipe}.yaml",
        cleandir / "runs",
        "--trainer.max_epochs=2",
        "--data.init_args.eval_seeds_per_prompt=6",
        "--trainer.callbacks=[]",
        *overrides,
    )
    s = summary(run)
    gain, se = _gain_and_se(s)
    assert s["eval_samples"] == 60
    assert gain > 0.1 and gain > 3 * se, (
        f"{recipe}: digit fidelity {s['reward_before']:.3f} -> {s['reward_after']:.3f} (SE {se:.3f})"
    )
