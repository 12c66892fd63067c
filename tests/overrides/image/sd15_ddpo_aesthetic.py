"""Builds the tiny random-weight folders that sd15_ddpo_aesthetic.yaml (the test override) points at."""

from pathlib import Path


def prepare(cwd: Path) -> None:
    """cwd/tiny_sd: a tiny SD 1.5-shaped pipeline; cwd/tiny_aesthetic: a tiny CLIPModel + aesthetic head."""
    import torch

    from diffalign.modalities.image.stable_diffusion import make_tiny_sd_pipeline
    from diffalign.rewards.image_models import AestheticMLP
    from tests.helpers import make_tiny_clip_folder

    make_tiny_sd_pipeline(cwd / "tiny_sd")
    make_tiny_clip_folder(cwd / "tiny_aesthetic" / "clip", image_size=16, projection_dim=16, layers=1)
    torch.save(AestheticMLP(16).state_dict(), cwd / "tiny_aesthetic" / "head.pth")
