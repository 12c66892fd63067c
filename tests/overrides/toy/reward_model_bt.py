"""Builds the AI-feedback pairs that recipes/toy/reward_model_bt.yaml reads, in the test folder."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    from tests.helpers import write_toy_feedback

    write_toy_feedback(cwd, "pairs")
