"""Shared helpers for tests that drive the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_fit(config: str | Path, run_root: Path, *overrides: str, extra_configs: tuple = ()) -> Path:
    """Run `diffalign fit` in-process; returns the run folder."""
    from diffalign.core.cli import cli_main

    args = ["fit", "--config", str(REPO / config)]
    for c in extra_configs:
        args += ["--config", str(c)]
    cli = cli_main(args + ["--run_root", str(run_root), *QUIET, *overrides])
    return Path(cli.trainer.log_dir)


def quiet_trainer(**kwargs):
    """A CPU `lightning.Trainer` with no logger, checkpoints, progress bar or model summary (kwargs add
    or override)."""
    import lightning as L

    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **kwargs})


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_toy_feedback(cwd: Path, layout: str = "pairs") -> Path:
    """The AI-feedback data the toy preference recipes read (16 prompts × 4 samples, TargetRegion)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.toy import MixtureBackbone
    from diffalign.rewards.toy import TargetRegion

    folder = cwd / "feedback" / ("feedback_target_unpaired" if layout == "unpaired" else "feedback_target")
    policy = DiffusionPolicy(MixtureBackbone(), num_steps=5)
    make_preference_dataset(
        policy,
        TargetRegion(),
        list(range(4)) * 4,
        folder,
        samples_per_prompt=4,
        pairs_per_prompt=1,
        layout=layout,
    )
    return folder


def write_digit_feedback(cwd: Path, layout: str = "pairs", groups_per_prompt: int = 2) -> Path:
    """The AI-feedback data the digit preference recipes read, made small: the shipped base model with
    2 sampling steps, the 10 digit prompts × `groups_per_prompt` × 4 samples, ranked by DigitFidelity
    (pairs: one per group; unpaired: every sample labelled)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.image import DIGIT_PROMPTS, ImageBackbone
    from diffalign.rewards.image import DigitFidelity

    name = "feedback_digit_fidelity_unpaired" if layout == "unpaired" else "feedback_digit_fidelity"
    folder = cwd / "feedback" / name
    policy = DiffusionPolicy(ImageBackbone(), num_steps=2)
    make_preference_dataset(
        policy,
        DigitFidelity(),
        list(DIGIT_PROMPTS) * groups_per_prompt,
        folder,
        samples_per_prompt=4,
        pairs_per_prompt=1,
        layout=layout,
    )
    return folder


def make_tiny_clip_folder(
    folder: Path, seed: int = 0, image_size: int = 32, projection_dim: int = 12, layers: int = 2
) -> Path:
    """A tiny random CLIPModel folder with tokenizer and preprocessor config (like openai/clip-*)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from diffalign.modalities.image.stable_diffusion import make_tiny_clip_tokenizer

    torch.manual_seed(seed)
    tok = make_tiny_clip_tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    CLIPModel(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
        )
    )
    return folder
