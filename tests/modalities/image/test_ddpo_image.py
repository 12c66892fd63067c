"""End to end: DDPO through the CLI raises a reward of the shipped digit model beyond seed noise.

Uses `Brightness` (a strong, global signal) on the compressibility recipe's settings (the ε model,
DDIM), so the test stays short; digit fidelity is the quick start's task (`make demo`, ~48 updates) and
is measured by benchmarks/image_alignment.py; tests/modalities/image/test_digit_alignment.py covers the
faster algorithms on it.
"""

import math

import pytest

from tests.helpers import run_fit, summary


@pytest.mark.slow
def test_ddpo_raises_brightness_of_digit_model(cleandir):
    run = run_fit(
        "recipes/image/ddpo_compressibility.yaml",
        cleandir / "runs",
        "--model.init_args.reward=diffalign.rewards.image.Brightness",
        "--model.init_args.reward.init_args.target=1.0",
        "--trainer.max_epochs=2",
        "--data.init_args.eval_seeds_per_prompt=8",
        "--trainer.callbacks=[]",
    )
    s = summary(run)
    n = s["eval_samples"]
    se = math.sqrt((s["reward_before_std"] ** 2 + s["reward_after_std"] ** 2) / n)
    gain = s["reward_after"] - s["reward_before"]
    assert n == 80 and s["global_step"] == 8
    assert gain > 3 * se, f"brightness {s['reward_before']:.3f} -> {s['reward_after']:.3f} (SE {se:.3f})"
