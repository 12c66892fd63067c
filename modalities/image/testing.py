"""Tiny image backbones built in code (random weights) for contract tests, in pixel and latent space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.modalities.image.backbone import ImageBackbone
from diffalign.modalities.image.conditioning import PromptConditioner

TINY_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}


def save_tiny_vae(folder: str | Path, image_channels: int = 3, latent_channels: int = 4) -> Path:
    """Save a random 2-level diffusers `AutoencoderKL` (16×16 images ↔ 8×8 latents) to `folder`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(str(folder))
    return Path(folder)


def tiny_image_backbone(vae_folder: str | Path | None = None, **overrides: Any) -> ImageBackbone:
    """A random-weight `ImageBackbone` of a few thousand parameters: pixel space (8×8 grayscale), or
    latent space over the VAE saved in `vae_folder` (4 latent channels, 8×8 latents of 16×16 RGB)."""
    cfg = {**TINY_CONFIG, **overrides}
    if vae_folder is not None:
        cfg["channels"] = overrides.get("channels", 4)
    cfg.setdefault("conditioner", PromptConditioner(cfg["cross_attention_dim"], max_length=6))
    return ImageBackbone(**cfg, weights=None, vae=None if vae_folder is None else str(vae_folder))
