"""Builds the AI-feedback pairs that recipes/molecule/dpo_qed.yaml reads, inside the test's working folder:
the shipped base model with 4 sampling steps, 2 groups of 4 molecules per atom count 6..15, ranked by QED."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.kernels import DDIMKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.molecule import MoleculeBackbone
    from diffalign.rewards.molecule import QED

    policy = DiffusionPolicy(MoleculeBackbone(), DDIMKernel(eta=1.0), num_steps=4)
    result = make_preference_dataset(
        policy,
        QED(invalid_value=0.0),
        list(range(6, 16)) * 2,
        cwd / "feedback" / "feedback_qed",
        samples_per_prompt=4,
        pairs_per_prompt=1,
    )
    assert result["rows"] >= 8, result  # two batches of 4 pairs
