"""What the video recipe tests build before a run (named by `prepare:` in tests/recipes/tiny.yaml)."""

from __future__ import annotations

from pathlib import Path


def write_video_feedback(cwd: Path) -> Path:
    """The AI-feedback pairs `recipes/video/dpo_motion.yaml` reads, made small: the shipped moving-digit flow
    model with 2 sampling steps, 4 prompts x 2 groups x 2 clips ranked by the motion classifier (8 pairs)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.kernels import FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.video import EVAL_PROMPTS, moving_digits_backbone
    from diffalign.rewards.video import MotionClassifierReward

    folder = cwd / "feedback" / "feedback_motion"
    policy = DiffusionPolicy(moving_digits_backbone("flow"), FlowSDEKernel(noise_level=0.7), num_steps=2)
    make_preference_dataset(
        policy,
        MotionClassifierReward(),
        list(EVAL_PROMPTS[:4]) * 2,
        folder,
        samples_per_prompt=2,
        pairs_per_prompt=1,
    )
    return folder
