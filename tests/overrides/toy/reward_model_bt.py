"""Builds the AI-feedback data that recipes/toy/dpo_target.yaml reads, inside the test's working folder."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.toy import MixtureBackbone
    from diffalign.rewards.toy import TargetRegion

    layout = "pairs"
    folder = "feedback_target_unpaired" if layout == "unpaired" else "feedback_target"
    policy = DiffusionPolicy(MixtureBackbone(), num_steps=5)
    make_preference_dataset(
        policy,
        TargetRegion(),
        list(range(4)) * 4,
        cwd / "feedback" / folder,
        samples_per_prompt=4,
        pairs_per_prompt=1,
        layout=layout,
    )
