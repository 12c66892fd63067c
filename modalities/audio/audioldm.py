"""AudioLDM (latent diffusion on mel spectrograms, a CLAP text encoder, a HiFi-GAN vocoder) as a `Backbone`.

Loads the parts of a diffusers AudioLDM folder (the layout `AudioLDMPipeline.save_pretrained` writes,
e.g. cvssp/audioldm-s-full-v2 or ucsd-reach/musicldm downloaded beforehand) from a LOCAL path, never from
the Hub:

```
<pretrained_path>/
├── unet/          UNet2DConditionModel (class embedding "simple_projection": the text embedding)
├── vae/           AutoencoderKL over (1, frames, mel bins) log-mel "images"
├── text_encoder/  ClapTextModelWithProjection
├── tokenizer/     RobertaTokenizer files
├── vocoder/       SpeechT5HifiGan (mel bins → waveform)
└── scheduler/     scheduler_config.json
```

The parts are loaded class by class, so the backbone does not depend on the pipeline class (diffusers
0.42 keeps `AudioLDMPipeline` under `pipelines/deprecated`; its folders load all the same).

- condition: prompt text under "prompt" → `{"text_embeds": (B, D)}`, CLAP's projected text embedding,
  L2-normalised (what AudioLDM's pipeline feeds the UNet's class embedding); the null condition is the
  embedding of "" (classifier-free guidance);
- model space: VAE latents (B, C, frames / f, mel bins / f) for a fixed `audio_length_s`; no mask;
- `decode`: vae.decode(z / scaling) → mel → vocoder → `AudioSamples` at the vocoder's rate, cut to
  `audio_length_s`; the audio requests of `layout.apply_request` (window, random_window, sample_rate);
- `encode`: waveforms → AudioLDM's log-mel (STFT `n_fft`, hop = the vocoder's up-sampling factor,
  Slaney mel filterbank of the vocoder's `model_in_dim` bands up to `f_max`, log of the magnitude
  clamped at 1e-5) → the VAE posterior mean × scaling. decode(encode(x)) is a vocoder/VAE
  reconstruction, not x;
- LoRA: wrap it in `core.lora.LoRABackbone` (`lora_target()` is the UNet); the VAE, text encoder and
  vocoder are `frozen_modules` (shared by the reference model, never trained).

`make_tiny_audioldm_pipeline(path)` writes a tiny random-weight folder of the same layout (tests, recipe
smoke runs on a CPU).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.core.backbone import Backbone
from diffalign.core.extras import require
from diffalign.core.functional import Generator, pad_stack, randn
from diffalign.core.types import Cond
from diffalign.modalities.audio.io import AudioOutputs
from diffalign.modalities.audio.layout import AudioSamples, apply_request, resample

require("transformers", "audio", "AudioLDMBackbone")

_WEIGHTS = (".safetensors", ".bin")


def _require(root: Path, part: str, needs: Sequence[Sequence[str]]) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(
            f"AudioLDM folder {root} does not exist (give a local path; nothing is downloaded)"
        )
    folder = root / part
    if not folder.is_dir():
        raise FileNotFoundError(f"AudioLDM '{part}' is missing: no folder {folder}")
    names = {p.name for p in folder.iterdir()}
    for group in needs:
        if not any((g.startswith(".") and any(n.endswith(g) for n in names)) or g in names for g in group):
            raise FileNotFoundError(f"AudioLDM '{part}' is incomplete: {folder} has none of {list(group)}")
    return folder


class AudioLDMBackbone(AudioOutputs, Backbone):
    """AudioLDM from a local diffusers folder (see the module docstring).

    Args:
        pretrained_path: the LOCAL folder (unet/, vae/, text_encoder/, tokenizer/, vocoder/, scheduler/).
        audio_length_s: clip length in seconds (rounded up to whole latent frames); None: the UNet's
            `sample_size` latent frames (AudioLDM's own default, 10.24 s).
        prediction_type: override the scheduler config's prediction type (None: read it).
        n_fft, f_max: the STFT window and top mel frequency of `encode`'s log-mel (AudioLDM: 1024, 8 kHz).
    """

    frozen_modules = ("vae", "text_encoder", "vocoder")
    decode_chunk_size = 8

    def __init__(
        self,
        pretrained_path: str,
        audio_length_s: float | None = None,
        prediction_type: str | None = None,
        n_fft: int = 1024,
        f_max: float | None = 8000.0,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, ClapTextModelWithProjection, SpeechT5HifiGan

        root = Path(pretrained_path).expanduser()
        parts = {
            "unet": _require(root, "unet", [["config.json"], _WEIGHTS]),
            "vae": _require(root, "vae", [["config.json"], _WEIGHTS]),
            "text_encoder": _require(root, "text_encoder", [["config.json"], _WEIGHTS]),
            "tokenizer": _require(root, "tokenizer", [["vocab.json", "tokenizer.json"]]),
            "vocoder": _require(root, "vocoder", [["config.json"], _WEIGHTS]),
            "scheduler": _require(root, "scheduler", [["scheduler_config.json"]]),
        }
        kw: dict[str, Any] = {"local_files_only": True}
        self.pretrained_path = str(root)
        self.unet = UNet2DConditionModel.from_pretrained(str(parts["unet"]), **kw)
        self.vae = AutoencoderKL.from_pretrained(str(parts["vae"]), **kw).requires_grad_(False).eval()
        self.text_encoder = ClapTextModelWithProjection.from_pretrained(str(parts["text_encoder"]), **kw)
        self.text_encoder.requires_grad_(False).eval()
        self.vocoder = (
            SpeechT5HifiGan.from_pretrained(str(parts["vocoder"]), **kw).requires_grad_(False).eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(parts["tokenizer"]), **kw)
        if len(self.tokenizer) < 4:
            raise ValueError(
                f"the tokenizer in {parts['tokenizer']} loaded with {len(self.tokenizer)} tokens"
            )
        config = json.loads((parts["scheduler"] / "scheduler_config.json").read_text(encoding="utf-8"))
        if "_class_name" not in config:
            raise ValueError(f"{parts['scheduler'] / 'scheduler_config.json'} has no _class_name")
        if prediction_type is not None:
            config["prediction_type"] = prediction_type
        self.scheduler_config = config
        self.prediction_type = config.get("prediction_type", "epsilon")

        voc = self.vocoder.config
        self.sample_rate = int(voc.sampling_rate)
        self.hop_length = int(torch.tensor(list(voc.upsample_rates)).prod())
        self.n_mels = int(voc.model_in_dim)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.n_mels % self.vae_scale_factor:
            raise ValueError(
                f"{self.n_mels} mel bins are not divisible by the VAE factor {self.vae_scale_factor}"
            )
        if audio_length_s is None:
            frames = int(self.unet.config.sample_size) * self.vae_scale_factor
        else:
            frames = -(-int(round(audio_length_s * self.sample_rate)) // self.hop_length)
            frames = -(-frames // self.vae_scale_factor) * self.vae_scale_factor
        self.frames = frames
        self.num_samples = int(
            round((audio_length_s or frames * self.hop_length / self.sample_rate) * self.sample_rate)
        )
        self.latent_shape = (
            int(self.unet.config.in_channels),
            frames // self.vae_scale_factor,
            self.n_mels // self.vae_scale_factor,
        )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.n_fft, self.f_max = n_fft, f_max
        self._null: dict[str, Tensor] = {}

    # -- conditions --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def lora_target(self) -> nn.Module:
        return self.unet

    def make_scheduler(self) -> Any:
        import diffusers

        cls = getattr(diffusers, self.scheduler_config["_class_name"], None)
        if cls is None:
            raise ValueError(
                f"unknown scheduler class {self.scheduler_config['_class_name']!r} in {self.pretrained_path}"
            )
        return cls.from_config(dict(self.scheduler_config))

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """CLAP's projected, L2-normalised text embeddings (B, D)."""
        tok = self.tokenizer(
            [str(p) for p in prompts], padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        out = self.text_encoder(
            tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        return F.normalize(out.text_embeds.float(), dim=-1)

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """{"prompt": [str, ...]} → {"text_embeds": (B, D)} (a dict prompt is written out as text)."""
        prompts = batch.get("prompt")
        if prompts is None:
            raise KeyError(f"AudioLDMBackbone needs text prompts under 'prompt'; got keys {sorted(batch)}")
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        return {"text_embeds": self.embed_text([_text(p) for p in prompts])}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        """The embedding of the empty prompt, for every row."""
        emb = cond["text_embeds"]
        if str(emb.device) not in self._null:
            self._null = {str(emb.device): self.embed_text([""]).to(emb.device)}
        return {"text_embeds": self._null[str(emb.device)].expand(emb.shape[0], -1)}

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, None]:
        return randn((len(cond), *self.latent_shape), generator, device=self.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        out = self.unet(x_t, t, encoder_hidden_states=None, class_labels=cond["text_embeds"].to(x_t.dtype))
        return out.sample.float()

    # -- sample layout -------------------------------------------------------------------------------------
    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> AudioSamples:
        """Latents → `AudioSamples` (B, 1, L) at the vocoder's rate (differentiable; see the module
        docstring)."""
        mel = self.vae.decode(x0.float() / self.scaling_factor).sample  # (B, 1, frames, mel bins)
        audio = self.vocoder(mel.squeeze(1).float())[:, : self.num_samples]
        samples = AudioSamples(audio[:, None].clamp(-1, 1), self.sample_rate)
        return apply_request(samples, request) if request else samples

    def log_mel(self, audio: Tensor) -> Tensor:
        """(B, L) waveforms → (B, 1, frames, mel bins): AudioLDM's log-magnitude Slaney mel spectrogram."""
        import torchaudio

        mel = torchaudio.transforms.MelSpectrogram(
            self.sample_rate, n_fft=self.n_fft, win_length=self.n_fft, hop_length=self.hop_length,
            n_mels=self.n_mels, f_min=0.0, f_max=self.f_max, power=1.0, norm="slaney", mel_scale="slaney",
            pad_mode="constant",
        ).to(audio.device)  # fmt: skip
        spec = torch.log(mel(audio.float()).clamp_min(1e-5))  # (B, mel bins, frames + 1)
        spec = spec[..., : self.frames]
        spec = F.pad(spec, (0, self.frames - spec.shape[-1]), value=float(torch.log(torch.tensor(1e-5))))
        return spec.transpose(1, 2)[:, None]

    def encode(self, samples: Any) -> tuple[Tensor, None]:
        """`AudioSamples`, a (B, 1, L) / (B, L) tensor or a list of clips → (latents, None)."""
        if isinstance(samples, AudioSamples):
            audio = resample(samples, self.sample_rate).audio.mean(1)
        elif isinstance(samples, Tensor):
            audio = samples.float().mean(1) if samples.dim() == 3 else samples.float()
        elif isinstance(samples, (list, tuple)) and samples:
            clips = [torch.as_tensor(c).float().reshape(-1) for c in samples]
            audio = pad_stack([c[None] for c in clips], axis=1)[0][:, 0]
        else:
            raise TypeError(
                "AudioLDMBackbone.encode takes AudioSamples, a tensor or a list of clips, "
                f"got {type(samples).__name__}"
            )
        with torch.no_grad():
            z = self.vae.encode(self.log_mel(audio.to(self.device))).latent_dist.mean
        return z * self.scaling_factor, None


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    from diffalign.modalities.audio.prompts import parse_prompt

    return parse_prompt(prompt).text()


def make_tiny_audioldm_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight AudioLDM folder (the classes and layout of AudioLDM) to `path`.

    UNet2DConditionModel (8, 16) with a "simple_projection" class embedding of an 8-dim CLAP text
    embedding, a 2-level AutoencoderKL over 1-channel mels (latent factor 2), a 1-layer
    ClapTextModelWithProjection with the in-code byte-level tokenizer, a SpeechT5HifiGan of 8 mel bins
    up-sampling 16× to 16 kHz, and a DDIM scheduler. Saved with diffusers' `AudioLDMPipeline`.
    """
    import warnings

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    from diffalign.modalities.audio.testing import make_tiny_roberta_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = make_tiny_roberta_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=8,
        class_embeddings_concat=True,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )  # fmt: skip
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=tokenizer.model_max_length + 4, projection_dim=8,
        )
    )  # fmt: skip
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4],
            upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AudioLDMPipeline

        pipe = AudioLDMPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            vocoder=vocoder,
        )
        pipe.save_pretrained(str(path))
    return path
