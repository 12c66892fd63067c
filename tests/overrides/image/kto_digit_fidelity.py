"""Builds the AI-feedback samples that recipes/image/kto_digit_fidelity.yaml reads, in the test folder."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    from tests.helpers import write_digit_feedback

    write_digit_feedback(cwd, "unpaired")
