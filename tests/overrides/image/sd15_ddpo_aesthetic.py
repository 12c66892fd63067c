"""Builds the tiny random-weight folders that sd15_ddpo_aesthetic.yaml (the test override) points at."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    """cwd/tiny_sd: a tiny SD 1.5-shaped pipeline; cwd/tiny_aesthetic: a tiny CLIPModel + aesthetic head."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from diffalign.modalities.image.stable_diffusion import make_tiny_clip_tokenizer, make_tiny_sd_pipeline
    from diffalign.rewards.image_models import AestheticMLP

    make_tiny_sd_pipeline(cwd / "tiny_sd")
    clip_dir = cwd / "tiny_aesthetic" / "clip"
    torch.manual_seed(0)
    tok = make_tiny_clip_tokenizer(clip_dir)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(clip_dir))
    torch.save(AestheticMLP(16).state_dict(), cwd / "tiny_aesthetic" / "head.pth")
