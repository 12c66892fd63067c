"""Builds the AI-feedback data that recipes/toy/kto_target.yaml reads, inside the test's working folder."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    from tests.helpers import write_toy_feedback

    write_toy_feedback(cwd, "unpaired")
