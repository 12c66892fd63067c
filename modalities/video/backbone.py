"""The video modality's backbone: a pixel-space diffusers `UNet3DConditionModel` over short clips.

Model space: float (B, C, F, H, W) in [−1, 1] (what the UNet3D takes: channels before frames).
Sample layout (what `decode` returns and video rewards receive): float (B, F', 3, H, W) in [0, 1], RGB
frames (a 1-channel model is repeated to 3 channels), F' the frames the request selects
(`frames.frame_indices`: all by default). `encode` takes (B, F, 3 | 1, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, randn
from diffalign.core.types import Cond
from diffalign.modalities.video.conditioner import MotionConditioner
from diffalign.modalities.video.frames import frame_indices, gather_frames

#: the shipped flow-matching moving-digit model (recipes/video/pretrain_flow.yaml); the base of every
#: moving-digit recipe (no ε-prediction model is shipped: train one with prediction_type "epsilon")
FLOW_BASE_WEIGHTS = "pkg://diffalign.modalities.video/moving_digits_flow_base.safetensors"

#: the shipped models' architecture
MOVING_DIGITS_CONFIG: dict[str, Any] = {
    "num_frames": 8,
    "sample_size": 16,
    "channels": 1,
    "block_out_channels": (16, 32, 48),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}


def to_clip_layout(x: Tensor) -> Tensor:
    """Model space (B, C, F, H, W) in [−1, 1] → frames (B, F, 3, H, W) in [0, 1] (C = 1 repeated)."""
    if x.dim() != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected model-space clips (B, 1|3, F, H, W), got {tuple(x.shape)}")
    frames = rearrange((x.float().clamp(-1, 1) + 1) / 2, "b c f h w -> b f c h w")
    return frames.expand(-1, -1, 3, -1, -1) if frames.shape[2] == 1 else frames


def from_clip_layout(clips: Tensor, channels: int) -> Tensor:
    """Frames (B, F, 3 | 1, H, W) in [0, 1] → model space (B, channels, F, H, W) in [−1, 1] (RGB → gray
    by the channel mean for 1-channel models)."""
    if not isinstance(clips, Tensor) or clips.dim() != 5 or clips.shape[2] not in (1, 3):
        shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise ValueError(f"expected clips (B, F, 3 | 1, H, W) in [0, 1], got {shape}")
    x = clips.float()
    if x.shape[2] != channels:
        if channels == 1:
            x = x.mean(2, keepdim=True)
        elif channels == 3:
            x = x.expand(-1, -1, 3, -1, -1)
        else:
            raise ValueError(f"cannot map {x.shape[2]}-channel frames to {channels} channels")
    return rearrange(x * 2 - 1, "b f c h w -> b c f h w")


def decode_frames(x0: Tensor, request: dict[str, Any], to_frames) -> Tensor:
    """Shared `decode` of the video backbones: pick the requested frames (B, C, F, …) of model space,
    then map only those through `to_frames` ((B, C, F', …) → (B, F', 3, H, W)). Refuses unknown keys."""
    generator = request.pop("generator", None)
    spec = request.pop("frames", "all")
    if request:
        raise ValueError(f"video decode takes the option 'frames' only, got {sorted(request)}")
    idx = frame_indices(spec, x0.shape[2], x0.shape[0], generator, x0.device)
    selected = rearrange(
        gather_frames(rearrange(x0, "b c f h w -> b f c h w"), idx), "b f c h w -> b c f h w"
    )
    return to_frames(selected)


def disable_dropout(module: nn.Module) -> nn.Module:
    """Set every dropout rate to 0 (diffusers' temporal convolutions default to 0.1): a policy's
    re-scored log-probabilities must equal the sampled ones in training mode too."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


class VideoBackbone(Backbone):
    """Conditioned clip diffusion with a diffusers `UNet3DConditionModel` in pixel space.

    The UNet3D runs per-frame 2D ResNets and attention with temporal convolutions and temporal
    attention between them. The condition (digit, direction, speed; `MotionConditioner`) reaches it by
    cross-attention in the attention blocks and, with `pooled_conditioning`, as the mean of its three
    tokens added to the time embedding (the UNet3D's `timestep_cond`), which every ResNet block sees.

    Args:
        num_frames, sample_size, channels: clip shape in model space (F, H = W, C).
        block_out_channels: UNet widths per resolution level.
        layers_per_block: ResNet layers per block.
        down_block_types / up_block_types: diffusers 3D block names (default: plain `DownBlock3D` /
            `UpBlock3D` at every level — the mid block always cross-attends, at the lowest resolution;
            attention at 16×16 × 8 frames costs most of a CPU step).
        cross_attention_dim: width of the condition tokens.
        attention_head_dim: diffusers' name for the number of heads of each attention block (the UNet3D's
            first temporal transformer uses 8 heads of this width).
        norm_num_groups: GroupNorm groups (must divide every width).
        pooled_conditioning: add the pooled condition to the time embedding.
        prediction_type: "epsilon", "v_prediction", "sample" (DDPM schedule) or "flow" (rectified flow).
        num_train_timesteps, beta_schedule, clip_sample: the noise schedule.
        conditioner: the condition encoder (default `MotionConditioner(cross_attention_dim)`).
        weights: safetensors (path or pkg:// spec) of the UNet and conditioner; None: random.
        decode_chunk_size: clips decoded at once by `SampleView`.
    """

    def __init__(
        self,
        num_frames: int = 8,
        sample_size: int = 16,
        channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 48),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        cross_attention_dim: int = 32,
        attention_head_dim: int = 4,
        norm_num_groups: int = 8,
        pooled_conditioning: bool = True,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "flow",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = True,
        conditioner: nn.Module | None = None,
        weights: str | None = FLOW_BASE_WEIGHTS,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers import UNet3DConditionModel

        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction, sample or flow, got {prediction_type!r}"
            )
        n = len(block_out_channels)
        down = tuple(down_block_types or ("DownBlock3D",) * n)
        up = tuple(up_block_types or ("UpBlock3D",) * n)
        if len(down) != n or len(up) != n:
            raise ValueError(f"{n} block_out_channels need {n} down and up block types, got {down} / {up}")
        self.num_frames, self.sample_size, self.channels = num_frames, sample_size, channels
        self.prediction_type = prediction_type
        self.num_train_timesteps, self.beta_schedule, self.clip_sample = (
            num_train_timesteps,
            beta_schedule,
            clip_sample,
        )
        self.decode_chunk_size = decode_chunk_size
        self.pooled_conditioning = pooled_conditioning
        self.unet = disable_dropout(
            UNet3DConditionModel(
                sample_size=sample_size,
                in_channels=channels,
                out_channels=channels,
                down_block_types=down,
                up_block_types=up,
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                norm_num_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                attention_head_dim=attention_head_dim,
                time_cond_proj_dim=cross_attention_dim if pooled_conditioning else None,
            )
        )
        self.conditioner = conditioner if conditioner is not None else MotionConditioner(cross_attention_dim)
        width = getattr(self.conditioner, "embed_dim", cross_attention_dim)
        if width != cross_attention_dim:
            raise ValueError(f"conditioner embed_dim {width} != cross_attention_dim {cross_attention_dim}")
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    # -- schedule and conditions ---------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return standard_scheduler(
            self.prediction_type, self.num_train_timesteps, self.beta_schedule, self.clip_sample
        )

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """`{"prompt": [text | dict | int, ...]}` → `{"motion_ids": (B, 3)}`; the conditions themselves
        reach rewards as metadata under "prompt" (`Backbone.condition`)."""
        if "prompt" not in batch:
            raise KeyError(
                f"VideoBackbone needs conditions under batch key 'prompt'; got keys {sorted(batch)}"
            )
        prompts = batch["prompt"]
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        if isinstance(prompts, Tensor):
            prompts = prompts.reshape(-1).tolist()
        return {k: v.to(self.device) for k, v in self.conditioner.encode(list(prompts)).items()}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        return self.conditioner.null(cond)

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        b = len(cond)
        shape = (b, self.channels, self.num_frames, self.sample_size, self.sample_size)
        return randn(shape, generator, device=self.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        hidden = self.conditioner(cond["motion_ids"])
        pooled = hidden.mean(dim=1) if self.pooled_conditioning else None
        return self.unet(x_t, t, encoder_hidden_states=hidden, timestep_cond=pooled).sample

    # -- sample layout -------------------------------------------------------------------------------
    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Tensor:
        """Model space → frames (B, F', 3, H, W) in [0, 1] (differentiable; clamps to the range).

        `frames=` selects the frames (`frames.frame_indices`: "all", "random", "first_middle_last", every
        k-th, or a list); only those are mapped. "random" draws from `generator=` when the core passes
        one.
        """
        return decode_frames(x0, dict(request), to_clip_layout)

    def encode(self, samples: Any) -> tuple[Tensor, None]:
        """Frames (B, F, 3 | 1, H, W) in [0, 1] → (model space (B, C, F, H, W) in [−1, 1], None)."""
        x = from_clip_layout(torch.as_tensor(samples), self.channels).to(self.device)
        expected = (self.channels, self.num_frames, self.sample_size, self.sample_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"clips of shape {tuple(samples.shape)} do not fit this model "
                f"(F={self.num_frames}, H=W={self.sample_size})"
            )
        return x, None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def lora_target(self) -> nn.Module:
        return self.unet

    def save_samples(
        self, samples: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """Write the decoded clips of `diffalign sample`: `folder/samples.gif` (an animated grid, one row
        per prompt, one column per seed) and `folder/samples.png` (its contact sheet), rewritten after
        every batch with all clips so far (`gifs.ClipGridWriter`), and each clip as
        `folder/clips/clip_<index>.gif` with its prompt in `folder/clips/prompts.json` (what
        `diffalign score folder/clips/prompts.json` reads)."""
        from diffalign.modalities.video.gifs import save_sample_clips

        return save_sample_clips(self, samples, folder, prompts, start_index, scale=4)


def moving_digits_backbone(
    prediction_type: str = "flow", weights: str | None = "shipped", **overrides: Any
) -> VideoBackbone:
    """The shipped architecture (`MOVING_DIGITS_CONFIG`) with the shipped flow-matching weights unless
    `weights` names others (None: random). Only a flow model is shipped: another `prediction_type` needs
    its own `weights` (or None)."""
    if weights == "shipped":
        if prediction_type != "flow":
            raise ValueError(
                f"no shipped {prediction_type!r} moving-digit model (only 'flow'): pass weights= a "
                "safetensors file or None"
            )
        weights = FLOW_BASE_WEIGHTS
    return VideoBackbone(
        **{**MOVING_DIGITS_CONFIG, **overrides}, prediction_type=prediction_type, weights=weights
    )
