"""Wan 2.1 text-to-video from a local diffusers folder, as a `Backbone` (flow matching, latent space).

`WanBackbone(pretrained_path=...)` loads the parts of a `WanPipeline` folder, each with
`from_pretrained(local_dir)` (nothing downloads): the `WanTransformer3DModel` is the denoiser
(trainable; `lora_target()`), the `AutoencoderKLWan` and the UMT5 text encoder are frozen
(`frozen_modules`, kept out of the state dict and shared with the reference model). Model space is the
normalised VAE latent (B, z, T, h, w) with T = (F − 1) / 4 + 1; the transformer predicts the
rectified-flow velocity v = ε − x0, so the core's `FlowSDEKernel` (Flow-GRPO / DanceGRPO's SDE) samples
and aligns it.

Memory levers (what makes full-size video alignment fit):

- **frame-subsampled decode**: `decode(frames=...)` decodes only the latent frames the requested pixel
  frames need. The Wan VAE is causal in time, so the first k latent frames decode exactly to the first
  1 + 4(k − 1) pixel frames: frame 0 costs one latent frame, "random" the prefix up to the drawn frame;
- **gradient checkpointing** of the transformer blocks (`gradient_checkpointing=True`) and of whole
  denoiser calls in reward backprop (the policy's `gradient_checkpointing`);
- **LoRA** through `core.lora.LoRABackbone` (the reference model is the same weights, adapters off);
- `dtype: bfloat16` for the transformer (the VAE stays float32), `decode_chunk_size` clips per decode,
  and text embeddings computed once per batch without gradient.

`save_tiny_wan_pipeline(folder)` writes a random-weight pipeline of the same classes (a few thousand
parameters, an offline word-level tokenizer) for tests and the recipe test.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from diffalign.core.backbone import Backbone
from diffalign.core.extras import require
from diffalign.core.functional import Generator, randn
from diffalign.core.types import Cond
from diffalign.modalities.video.backbone import from_clip_layout
from diffalign.modalities.video.conditions import parse_condition

#: sub-folders a Wan pipeline folder must have
WAN_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")


def _check_folder(path: str | Path) -> Path:
    from diffalign.core.io import resolve_path

    try:
        folder = resolve_path(str(path))
    except FileNotFoundError:
        folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Wan pipeline folder not found: {folder} (a diffusers WanPipeline saved with save_pretrained, "
            "e.g. a local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; nothing is downloaded)"
        )
    missing = [c for c in ("model_index.json", *WAN_COMPONENTS) if not (folder / c).exists()]
    if missing:
        raise FileNotFoundError(f"Wan pipeline folder {folder} lacks {missing}")
    return folder


def _prompt_text(prompt: Any) -> str:
    """A prompt for a text encoder: text as is; a moving-digit dict or int as its canonical text."""
    return prompt if isinstance(prompt, str) else parse_condition(prompt).text()


class WanBackbone(Backbone):
    """A local Wan 2.1 text-to-video pipeline as a flow-matching backbone.

    Args:
        pretrained_path: the local `WanPipeline` folder (path or pkg:// spec).
        num_frames: frames per clip (1 mod the VAE's temporal factor 4: 17, 33, 81, ...).
        height, width: pixels (multiples of the VAE's spatial factor × the patch size, 16).
        flow_shift: the flow-matching schedule's shift (Wan uses 3 at 480p, 5 at 720p).
        max_sequence_length: text tokens (Wan: 512; shorter is cheaper).
        negative_prompt: the null condition of classifier-free guidance.
        gradient_checkpointing: recompute each transformer block in the backward pass.
        dtype: dtype of the transformer ("float32", "bfloat16", "float16"); the VAE and text encoder
            stay float32.
        decode_chunk_size: clips decoded at once by `SampleView`.
    """

    prediction_type = "flow"
    frozen_modules = ("_vae", "_text_encoder")

    def __init__(
        self,
        pretrained_path: str,
        num_frames: int = 17,
        height: int = 480,
        width: int = 832,
        flow_shift: float = 3.0,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
        decode_chunk_size: int | None = 1,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        require("transformers", "video", "WanBackbone")
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = _check_folder(pretrained_path)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        # torch_dtype (not .to) keeps the modules Wan needs in float32 (rope, time embedder, norms)
        self.transformer = WanTransformer3DModel.from_pretrained(
            str(folder), subfolder="transformer", torch_dtype=getattr(torch, dtype), local_files_only=True
        )
        vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
        self._vae: list[nn.Module] = [vae.requires_grad_(False).eval()]  # lists keep frozen parts out of
        self._text_encoder: list[nn.Module] = [text_encoder.requires_grad_(False).eval()]  # the state dict
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        if len(self.tokenizer) < 3:
            raise ValueError(
                f"the tokenizer in {folder / 'tokenizer'} has {len(self.tokenizer)} tokens: broken files?"
            )
        self.time_factor = int(vae.config.scale_factor_temporal or 4)
        self.space_factor = int(vae.config.scale_factor_spatial or 8)
        patch = self.transformer.config.patch_size
        if (num_frames - 1) % self.time_factor:
            raise ValueError(f"num_frames − 1 must be a multiple of {self.time_factor}, got {num_frames}")
        for name, size in (("height", height), ("width", width)):
            if size % (self.space_factor * patch[1]):
                raise ValueError(f"{name} must be a multiple of {self.space_factor * patch[1]}, got {size}")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.latent_frames = (num_frames - 1) // self.time_factor + 1
        self.flow_shift, self.max_sequence_length = flow_shift, max_sequence_length
        self.negative_prompt = negative_prompt
        self.decode_chunk_size = decode_chunk_size
        z = vae.config.z_dim
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1), False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1), False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self._null: dict[Any, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    @property
    def vae(self) -> nn.Module:
        return self._vae[0].to(self.device)

    def make_scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.flow_shift)

    # -- conditions ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> Tensor:
        """UMT5 embeddings (B, L, D) of `prompts`, zero past each prompt's tokens (as WanPipeline does)."""
        encoder = self._text_encoder[0].to(self.device)
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = encoder(ids, mask).last_hidden_state.float()
        return hidden * mask[..., None]

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """`{"prompt": [text, ...]}` → `{"prompt_embeds": (B, L, D)}` (moving-digit dicts become their
        canonical text)."""
        if "prompt" not in batch:
            raise KeyError(f"WanBackbone needs prompts under batch key 'prompt'; got keys {sorted(batch)}")
        prompts = batch["prompt"]
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        return {"prompt_embeds": self.embed([_prompt_text(p) for p in prompts])}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        key = str(self.device)
        if key not in self._null:
            self._null[key] = self.embed([self.negative_prompt])
        e = self._null[key]
        return {"prompt_embeds": e.expand(len(cond), -1, -1).clone()}

    # -- denoising -----------------------------------------------------------------------------------
    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        z = self.latents_mean.shape[1]
        shape = (
            len(cond),
            z,
            self.latent_frames,
            self.height // self.space_factor,
            self.width // self.space_factor,
        )
        return randn(shape, generator, device=self.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        dtype = self.transformer.dtype
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    # -- sample layout -------------------------------------------------------------------------------
    def latent_prefix(self, last_frame: int) -> int:
        """How many latent frames decode pixel frames 0 … `last_frame` (the VAE is causal)."""
        return 1 if last_frame <= 0 else (last_frame - 1) // self.time_factor + 2

    def _decode_latents(self, x0: Tensor, pixel_frames: int) -> Tensor:
        """Normalised latents → pixel clips (B, 3, F, H, W) in [−1, 1], decoding the latent prefix the
        first `pixel_frames` frames need."""
        z = x0[:, :, : self.latent_prefix(pixel_frames - 1)].float()
        video = self.vae.decode(z * self.latents_std + self.latents_mean, return_dict=False)[0]
        return video[:, :, :pixel_frames]

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Tensor:
        """Latents → frames (B, F', 3, H, W) in [0, 1] (differentiable through the VAE). `frames=` selects
        the frames (`frames.frame_indices`); only the latent prefix they need is decoded."""
        from diffalign.modalities.video.frames import frame_indices, gather_frames

        request = dict(request)
        generator = request.pop("generator", None)
        spec = request.pop("frames", "all")
        if request:
            raise ValueError(f"video decode takes the option 'frames' only, got {sorted(request)}")
        idx = frame_indices(spec, self.num_frames, x0.shape[0], generator, x0.device)
        video = self._decode_latents(x0, int(idx.max()) + 1)
        frames = gather_frames(rearrange(video, "b c f h w -> b f c h w"), idx)
        return ((frames + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: Any) -> tuple[Tensor, None]:
        """Frames (B, F, 3, H, W) in [0, 1] → (normalised latent means (B, z, T, h, w), None)."""
        x = from_clip_layout(torch.as_tensor(samples).to(self.device), 3)
        if tuple(x.shape[2:]) != (self.num_frames, self.height, self.width):
            raise ValueError(
                f"clips of shape {tuple(samples.shape)} do not fit this model "
                f"(F={self.num_frames}, H={self.height}, W={self.width})"
            )
        latents = self.vae.encode(x).latent_dist.mean
        return (latents - self.latents_mean) / self.latents_std, None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.transformer.parameters() if p.requires_grad)

    def lora_target(self) -> nn.Module:
        return self.transformer

    def save_samples(
        self, samples: Tensor, folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """`samples.gif` / `samples.png` of the clips so far and one GIF per clip under `clips/`
        (`gifs.save_sample_clips`)."""
        from diffalign.modalities.video.gifs import save_sample_clips

        return save_sample_clips(self, samples, folder, prompts, start_index, scale=1)


#: the words of the tiny tokenizer (the moving-digit prompts and a few more)
TINY_WORDS = [
    *("a", "an", "the", "digit", "moving", "left", "right", "up", "down", "slow", "slowly", "fast"),
    *("quickly", "cat", "dog", "video", "of", ",", "."),
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *(str(d) for d in range(10)),
]


def save_tiny_wan_pipeline(
    folder: str | Path, seed: int = 0, vae_base_dim: int = 3, num_heads: int = 2, num_layers: int = 2
) -> Path:
    """Write a random-weight `WanPipeline` (tiny UMT5, VAE and transformer, a word-level tokenizer built
    offline) to `folder`; `WanBackbone(folder, num_frames=9, height=32, width=32, max_sequence_length=8)`
    runs it on a CPU in a fraction of a second per step. `vae_base_dim`, `num_heads` (of width 8) and
    `num_layers` make it larger (the memory benchmark)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    require("tokenizers", "video", "save_tiny_wan_pipeline")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(vocab),
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=vae_base_dim,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16 * num_heads,
        num_layers=num_layers,
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)
