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


TINY = REPO / "tests" / "recipes" / "tiny.yaml"
TINY_KEYS = {"config", "prepare", "prepare_args"}


def load_tiny() -> dict:
    """tests/recipes/tiny.yaml: the tiny settings of the recipe test (see its header)."""
    import yaml

    data = yaml.safe_load(TINY.read_text())
    return {"fragments": data.get("fragments") or {}, "recipes": data.get("recipes") or {}}


def recipe_name(recipe: str | Path) -> str:
    """`toy/ddpo_mode` for recipes/toy/ddpo_mode.yaml (a path relative to the repo, or absolute)."""
    path = Path(recipe)
    path = path.relative_to(REPO) if path.is_absolute() else path
    return path.relative_to("recipes").with_suffix("").as_posix()


def _merged(a: dict, b: dict) -> dict:
    """`b` over `a` as the parser merges config files: mappings key by key, anything else (lists) whole."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_configs(recipe: str | Path, folder: Path) -> list[Path]:
    """The tiny settings of one recipe as a YAML file in `folder/tiny/` (named like the recipe, so the run
    folder keeps the recipe's name), or none: the entry of each fragment the recipe builds on (its
    `bases:` chain, in order), then its own exception's `config`."""
    import yaml

    from diffalign.core.recipes import recipe_chain

    tiny, root, name = load_tiny(), REPO / "recipes", recipe_name(recipe)
    chain = recipe_chain(root / f"{name}.yaml")[:-1]
    parts = [tiny["fragments"].get(p.resolve().relative_to(root).as_posix()) for p in chain]
    parts.append(tiny["recipes"].get(name, {}).get("config"))
    merged: dict = {}
    for part in parts:
        merged = _merged(merged, part or {})
    if not merged:
        return []
    path = folder / "tiny" / f"{Path(name).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return [path]


def prepare_recipe(recipe: str | Path, folder: Path) -> None:
    """Call the recipe's `prepare` function of tests/recipes/tiny.yaml, if it has one, in `folder`."""
    import importlib

    entry = load_tiny()["recipes"].get(recipe_name(recipe), {})
    if entry.get("prepare"):
        module, _, name = entry["prepare"].rpartition(".")
        getattr(importlib.import_module(module), name)(folder, **(entry.get("prepare_args") or {}))


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


def write_molecule_feedback(cwd: Path) -> Path:
    """The AI-feedback pairs the molecule DPO recipe reads, made small: the shipped base model with 4
    sampling steps, 2 groups of 4 molecules per atom count 6..15, ranked by QED (invalid = 0)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.kernels import DDIMKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.molecule import MoleculeBackbone
    from diffalign.rewards.molecule import QED

    folder = cwd / "feedback" / "feedback_qed"
    policy = DiffusionPolicy(MoleculeBackbone(), DDIMKernel(eta=1.0), num_steps=4)
    result = make_preference_dataset(
        policy,
        QED(invalid_value=0.0),
        list(range(6, 16)) * 2,
        folder,
        samples_per_prompt=4,
        pairs_per_prompt=1,
    )
    assert result["rows"] >= 8, result  # two batches of 4 pairs
    return folder


def write_shape_feedback(cwd: Path) -> Path:
    """The AI-feedback pairs the shape DPO recipe reads, made small: the shipped flow model with 2 sampling
    steps, the 6 primitive prompts × 2 groups × 4 samples, ranked by the view classifier."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.kernels import FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.shape3d import SHAPE_PROMPTS, ShapeBackbone
    from diffalign.rewards.shape3d import ViewClassFidelity

    folder = cwd / "feedback" / "feedback_view_fidelity"
    policy = DiffusionPolicy(ShapeBackbone(), FlowSDEKernel(0.7), num_steps=2)
    result = make_preference_dataset(
        policy, ViewClassFidelity(), list(SHAPE_PROMPTS) * 2, folder, samples_per_prompt=4, pairs_per_prompt=1
    )
    assert result["rows"] >= 8, result  # two batches of 4 pairs
    return folder


def save_random_digit_scorer(cwd: Path) -> Path:
    """Random-init DigitScorer weights where `recipes/image/ddpo_learned_digits.yaml` loads its reward
    model (a test of the plumbing, not of the reward)."""
    import torch

    from diffalign.core.io import save_state_dict
    from diffalign.rewards.image import DigitScorer

    torch.manual_seed(0)
    path = cwd / "reward_models" / "digits_bt.safetensors"
    save_state_dict(DigitScorer(), path)
    return path


def make_tiny_sd15_folders(cwd: Path) -> None:
    """What the tiny settings of `recipes/image/sd15_ddpo_aesthetic.yaml` point at: `cwd/tiny_sd`, a tiny
    SD 1.5-shaped pipeline, and `cwd/tiny_aesthetic`, a tiny CLIPModel plus an aesthetic head."""
    import torch

    from diffalign.modalities.image.stable_diffusion import make_tiny_sd_pipeline
    from diffalign.rewards.image_models import AestheticMLP

    make_tiny_sd_pipeline(cwd / "tiny_sd")
    make_tiny_clip_folder(cwd / "tiny_aesthetic" / "clip", image_size=16, projection_dim=16, layers=1)
    torch.save(AestheticMLP(16).state_dict(), cwd / "tiny_aesthetic" / "head.pth")


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


def make_tiny_wan_folders(cwd: Path) -> None:
    """What the tiny settings of `recipes/video/wan21_grpo_aesthetic_flicker.yaml` point at: `cwd/tiny_wan`, a
    tiny random Wan 2.1 pipeline, and `cwd/tiny_aesthetic`, a tiny CLIPModel plus an aesthetic head."""
    import torch

    from diffalign.modalities.video.wan import save_tiny_wan_pipeline
    from diffalign.rewards.image_models import AestheticMLP

    save_tiny_wan_pipeline(cwd / "tiny_wan")
    make_tiny_clip_folder(cwd / "tiny_aesthetic" / "clip", image_size=16, projection_dim=16, layers=1)
    torch.save(AestheticMLP(16).state_dict(), cwd / "tiny_aesthetic" / "head.pth")


def write_audio_feedback(cwd: Path) -> Path:
    """The pairs `recipes/audio/dpo_pitch.yaml` reads, made small: the shipped mel model with 2 sampling
    steps, 8 prompts × 4 samples, ranked by the RMS loudness proxy (a 2-step sample has barely a pitch, and a
    continuous score leaves no ties: the recipe test needs pairs, not good ones)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.audio import MelBackbone, note_prompts
    from diffalign.rewards.audio import RMSLoudness

    folder = cwd / "feedback" / "feedback_pitch"
    policy = DiffusionPolicy(MelBackbone(), num_steps=2)
    result = make_preference_dataset(
        policy, RMSLoudness(), note_prompts(["sine"]), folder, samples_per_prompt=4, pairs_per_prompt=1
    )
    assert result["rows"] >= 8, result  # two batches of 4 pairs
    return folder


def make_tiny_audioldm_folders(cwd: Path) -> None:
    """What the tiny settings of the AudioLDM recipes point at: `cwd/tiny_audioldm`, a tiny AudioLDM-shaped
    pipeline, and `cwd/tiny_clap`, a tiny ClapModel with its tokenizer and feature extractor."""
    from diffalign.modalities.audio.audioldm import make_tiny_audioldm_pipeline
    from diffalign.modalities.audio.testing import make_tiny_clap_folder

    make_tiny_audioldm_pipeline(cwd / "tiny_audioldm")
    make_tiny_clap_folder(cwd / "tiny_clap")


def write_audioldm_feedback(cwd: Path) -> Path:
    """The tiny folders plus the CLAP-ranked pairs `recipes/audio/audioldm_dpo_clap.yaml` reads (the tiny
    AudioLDM with 2 steps, 4 prompts × 2 groups × 4 samples)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.audio.audioldm import AudioLDMBackbone
    from diffalign.rewards.audio_models import CLAPScore

    make_tiny_audioldm_folders(cwd)
    folder = cwd / "feedback" / "audioldm_clap"
    policy = DiffusionPolicy(AudioLDMBackbone(str(cwd / "tiny_audioldm"), audio_length_s=0.032), num_steps=2)
    prompts = ["a dog barking", "rain on a roof", "a piano", "birds singing"] * 2
    result = make_preference_dataset(
        policy, CLAPScore(str(cwd / "tiny_clap")), prompts, folder, samples_per_prompt=4, pairs_per_prompt=1
    )
    assert result["rows"] >= 4, result
    return folder


def toy_recipe_gain(name: str, tmp_path: Path, epochs: int) -> tuple[float, float, dict]:
    """Train `recipes/toy/<name>.yaml` for `epochs` and return (reward gain over the fixed evaluation set,
    the standard error of its mean before training, the run's summary.json) for the e2e gain tests."""
    import math

    run = run_fit(
        f"recipes/toy/{name}.yaml",
        tmp_path,
        f"--trainer.max_epochs={epochs}",
        "--data.init_args.eval_seeds_per_prompt=32",
    )
    s = summary(run)
    stderr = s["reward_before_std"] / math.sqrt(s["eval_samples"])
    return s["reward_after"] - s["reward_before"], stderr, s
