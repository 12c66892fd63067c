"""Saves the reward-model weights recipes/image/ddpo_learned_digits.yaml loads (a random-init DigitScorer:
the test checks the plumbing, not the reward) inside the test's working folder."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    import torch

    from diffalign.core.io import save_state_dict
    from diffalign.rewards.image import DigitScorer

    torch.manual_seed(0)
    save_state_dict(DigitScorer(), cwd / "reward_models" / "digits_bt.safetensors")
