"""The image modality's backbone: a diffusers `UNet2DConditionModel` in pixel or latent space.

Sample layout (what `decode` returns and rewards receive): float tensor (B, 3, H, W) in [0, 1], RGB.
Single-channel models (the digits) are repeated to 3 channels. `encode` takes that layout, or
(B, 1, H, W) grayscale, and returns model space: pixels in [−1, 1] (pixel mode) or scaled VAE latents
(latent mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, randn
from diffalign.core.types import Cond
from diffalign.modalities.image.conditioning import PromptConditioner

BASE_WEIGHTS = "pkg://diffalign.modalities.image/digits_base.safetensors"
#: the flow-matching digit model (prediction_type "flow"), trained by recipes/image/pretrain_digits_flow.yaml
FLOW_BASE_WEIGHTS = "pkg://diffalign.modalities.image/digits_flow_base.safetensors"

#: the shipped digit model's architecture (what `recipes/image/pretrain_digits.yaml` trains)
DIGITS_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "channels": 1,
    "block_out_channels": (32, 48),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}


def to_sample_layout(x: Tensor) -> Tensor:
    """Model-space pixels in [−1, 1] (B, C, H, W) → float (B, 3, H, W) in [0, 1] (C = 1 is repeated)."""
    img = (x.float().clamp(-1, 1) + 1) / 2
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    elif img.shape[1] != 3:
        raise ValueError(f"cannot show {img.shape[1]}-channel images as RGB (expected 1 or 3 channels)")
    return img


def from_sample_layout(images: Tensor, channels: int) -> Tensor:
    """(B, 3, H, W) or (B, 1, H, W) in [0, 1] → (B, channels, H, W) in [−1, 1] (RGB→gray by mean)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 3, H, W) or (B, 1, H, W) in [0, 1], got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif channels == 3:
            x = x.repeat(1, 3, 1, 1)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to {channels} channels")
    return x * 2 - 1


class ImageBackbone(Backbone):
    """Text-conditioned image diffusion with a diffusers `UNet2DConditionModel` (cross-attention).

    Pixel space by default; with `vae` (a local diffusers `AutoencoderKL` folder) the UNet runs on
    latents and `decode`/`encode` go through the frozen VAE. The prompt conditioner
    (`PromptConditioner` unless given) is trained with the UNet.

    Args:
        sample_size: spatial size of model space (pixels, or latents in latent mode).
        channels: channels of model space (1 for the grayscale digits; the VAE's latent channels).
        block_out_channels: UNet widths per resolution level.
        layers_per_block: ResNet layers per UNet block.
        down_block_types / up_block_types: diffusers block names (default: a plain block at full
            resolution, cross-attention blocks below it; the mid block always cross-attends).
        cross_attention_dim: width of the prompt embeddings.
        pooled_conditioning: also add the prompt embedding, mean-pooled over tokens, to the time
            embedding of every ResNet block (diffusers' "projection" class embedding, like SDXL's pooled
            text embedding). Cross-attention alone runs at 8×8 and below and learns the prompt slowly; the
            pooled path lets a small model follow it after a few hundred steps.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every block width).
        prediction_type: "epsilon", "v_prediction" or "sample" (a DDPM schedule; DDIM/DDPM kernels), or
            "flow" (rectified flow, the model predicts v = ε − x0 on a `FlowMatchEulerDiscreteScheduler`;
            `FlowSDEKernel`). `FLOW_BASE_WEIGHTS` is the shipped flow-matching digit model.
        num_train_timesteps, beta_schedule: the DDPM noise schedule (beta_schedule unused for "flow").
        clip_sample: clip the predicted x0 to [−1, 1] while sampling (pixel mode only).
        conditioner: the prompt encoder module (default `PromptConditioner(cross_attention_dim)`).
        weights: safetensors weights (path or pkg:// spec) of the UNet and conditioner; the default
            is the shipped digit model trained by `recipes/image/pretrain_digits.yaml`. None: random.
        vae: local folder of a diffusers `AutoencoderKL` (latent mode) or None (pixel mode).
        vae_scaling_factor: latent scale (default: the VAE config's `scaling_factor`).
    """

    frozen_modules = ("_vae",)

    def __init__(
        self,
        sample_size: int = 16,
        channels: int = 1,
        block_out_channels: Sequence[int] = (32, 48),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        cross_attention_dim: int = 32,
        pooled_conditioning: bool = True,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = True,
        conditioner: nn.Module | None = None,
        weights: str | None = BASE_WEIGHTS,
        vae: str | None = None,
        vae_scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction, sample or flow, got {prediction_type!r}"
            )
        n = len(block_out_channels)
        down = tuple(down_block_types or ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1))
        up = tuple(up_block_types or ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))
        if len(down) != n or len(up) != n:
            raise ValueError(f"{n} block_out_channels need {n} down and up block types, got {down} / {up}")
        self.sample_size, self.channels = sample_size, channels
        self.prediction_type = prediction_type
        self.num_train_timesteps, self.beta_schedule = num_train_timesteps, beta_schedule
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            class_embed_type="projection" if pooled_conditioning else None,
            projection_class_embeddings_input_dim=cross_attention_dim if pooled_conditioning else None,
        )
        self.pooled_conditioning = pooled_conditioning
        self.conditioner = conditioner if conditioner is not None else PromptConditioner(cross_attention_dim)
        width = getattr(self.conditioner, "embed_dim", cross_attention_dim)
        if width != cross_attention_dim:
            raise ValueError(f"conditioner embed_dim {width} != cross_attention_dim {cross_attention_dim}")
        self._vae: list[nn.Module] = []  # a list keeps the frozen VAE out of state_dict and checkpoints
        self.vae_path = vae
        self.scaling_factor = 1.0
        if vae is not None:
            from diffusers import AutoencoderKL

            from diffalign.core.io import resolve_path

            model = AutoencoderKL.from_pretrained(str(resolve_path(vae)))
            model.requires_grad_(False).eval()
            if model.config.latent_channels != channels:
                raise ValueError(
                    f"VAE {vae} has {model.config.latent_channels} latent channels but channels={channels}"
                )
            self._vae.append(model)
            self.scaling_factor = float(vae_scaling_factor or model.config.get("scaling_factor", 1.0))
        self.clip_sample = clip_sample and vae is None
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    # -- schedule and conditions ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    def make_scheduler(self) -> Any:
        return standard_scheduler(
            self.prediction_type, self.num_train_timesteps, self.beta_schedule, self.clip_sample
        )

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """`{"prompt": [str, ...]}` → `{"tokens": (B, L)}` (see `PromptConditioner`); the prompt text
        itself reaches rewards as metadata (`Backbone.condition`)."""
        if "prompt" not in batch:
            raise KeyError(f"ImageBackbone needs prompts under batch key 'prompt'; got keys {sorted(batch)}")
        prompts = batch["prompt"]
        if isinstance(prompts, str):
            prompts = [prompts]
        return {k: v.to(self.device) for k, v in self.conditioner.encode(list(prompts)).items()}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        return self.conditioner.null(cond)

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        b = cond["tokens"].shape[0]
        shape = (b, self.channels, self.sample_size, self.sample_size)
        return randn(shape, generator, device=self.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        hidden = self.conditioner(cond["tokens"])
        pooled = hidden.mean(dim=1) if self.pooled_conditioning else None
        return self.unet(x_t, t, encoder_hidden_states=hidden, class_labels=pooled).sample

    # -- sample layout -------------------------------------------------------------------------------
    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Tensor:
        """Model space → float (B, 3, H, W) in [0, 1] (differentiable; clamps to the range). No options."""
        request.pop("generator", None)
        if request:
            raise ValueError(f"ImageBackbone.decode takes no options, got {sorted(request)}")
        if self._vae:
            vae = self._vae[0].to(x0.device)
            x0 = vae.decode(x0.float() / self.scaling_factor).sample
        return to_sample_layout(x0)

    def encode(self, samples: Tensor) -> tuple[Tensor, None]:
        """(B, 3, H, W) or (B, 1, H, W) in [0, 1] → (model space (pixels in [−1, 1] or scaled latents),
        None)."""
        samples = torch.as_tensor(samples).to(self.device)
        if self._vae:
            vae = self._vae[0].to(samples.device)
            x = from_sample_layout(samples, vae.config.in_channels)
            with torch.no_grad():
                return vae.encode(x).latent_dist.mean * self.scaling_factor, None
        return from_sample_layout(samples, self.channels), None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def save_samples(
        self, samples: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """Write the decoded `samples` (B, 3, H, W) in [0, 1] of `diffalign sample` as a labelled grid,
        `folder/samples.png`, rewritten after every batch with all samples so far: one row per prompt,
        one column per seed, small images upscaled (16×16 → 64×64; `grids.PromptGridWriter`)."""
        from diffalign.modalities.image.grids import PromptGridWriter

        if getattr(self, "_grid_writer", None) is None:
            self._grid_writer = PromptGridWriter()
        return self._grid_writer(samples, folder, prompts, start_index=start_index)


def digits_backbone(weights: str | None = BASE_WEIGHTS, **overrides: Any) -> ImageBackbone:
    """The digit model's architecture (`DIGITS_CONFIG`) with the shipped weights unless `weights`."""
    return ImageBackbone(**{**DIGITS_CONFIG, **overrides}, weights=weights)
