"""The audio backbones: mel-spectrogram diffusion (diffusers `UNet2DConditionModel` + a fixed Griffin–Lim
inverse) and waveform diffusion (diffusers `UNet1DModel`).

Both speak the same condition and sample layout:

- condition: an audio prompt (text "a C4 square note, quiet" or a dict, `prompts.parse_prompt`) under
  batch key "prompt"; `encode_condition` gives token slots `{"tokens": (B, 2 + max_notes)}` and
  `{"num_notes": (B,)}`; the null condition (classifier-free guidance) empties every slot;
- duration: a clip of k notes lasts k × `note_samples` samples (0.256 s at 8 kHz), so durations vary
  with the prompt, up to `max_notes` notes. Model space has room for `max_notes` notes; `init_noise`
  returns a mask of the real part (`variable_axis` is the time axis) and the core keeps the padding at 0;
- sample layout (`decode`): `layout.AudioSamples` — audio (B, 1, L) float in [−1, 1] at
  `sample_rate`, lengths (B,), padding zero. Decode requests (audio rewards): `window` [start_s,
  end_s], `random_window` duration_s, `sample_rate` Hz (`layout.apply_request`);
- `encode` takes `AudioSamples`, a (B, 1, L) or (B, L) tensor of full-length clips, or a list of clips
  (C, L_i) / (L_i,) of different lengths (at `sample_rate`; longer than the model's room raises).

The denoiser runs once per distinct clip length in a batch, on that length only (rounded up to what
the UNet's down-sampling needs), so a clip's output never depends on the padding or on which other
clips share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, masked_noise, pad_stack
from diffalign.core.types import Cond
from diffalign.modalities.audio.io import AudioOutputs
from diffalign.modalities.audio.layout import AudioSamples, apply_request, resample
from diffalign.modalities.audio.mel import MelCodec
from diffalign.modalities.audio.prompts import MAX_NOTES, NoteConditioner, num_notes, tokenize
from diffalign.modalities.audio.synth import NOTE_SAMPLES, SAMPLE_RATE

PKG = "pkg://diffalign.modalities.audio"
#: the shipped mel-spectrogram model (ε prediction), trained by recipes/audio/pretrain_mel.yaml
MEL_BASE_WEIGHTS = f"{PKG}/mel_base.safetensors"
#: the shipped waveform model (flow matching), trained by recipes/audio/pretrain_wave.yaml
WAVE_BASE_WEIGHTS = f"{PKG}/wave_flow_base.safetensors"
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
        raise ValueError(
            f"prediction_type must be epsilon, v_prediction, sample or flow, got {prediction_type!r}"
        )


class AudioBackbone(AudioOutputs, Backbone):
    """What both audio backbones share: conditions, durations, the layout, grouping by length.

    Subclasses set `variable_axis`, `multiple` (the length granularity the UNet needs) and implement
    `units(num_samples)` (model-space length of a clip), `to_model(audio)` / `from_model(x)` (waveforms
    (B, 1, L) ↔ model space) and `_network(x, t, cond)` (the UNet call on clips of one length).
    """

    multiple: int = 1
    decode_chunk_size = 64

    def __init__(
        self,
        sample_rate: int,
        note_samples: int,
        max_notes: int,
        prediction_type: str,
        num_train_timesteps: int,
        beta_schedule: str,
        clip_sample: bool,
        embed_dim: int,
    ) -> None:
        super().__init__()
        _check_prediction_type(prediction_type)
        if not 1 <= max_notes <= MAX_NOTES:
            raise ValueError(f"max_notes must be in [1, {MAX_NOTES}], got {max_notes}")
        self.sample_rate, self.note_samples, self.max_notes = int(sample_rate), int(note_samples), max_notes
        self.prediction_type = prediction_type
        self.num_train_timesteps, self.beta_schedule, self.clip_sample = (
            num_train_timesteps,
            beta_schedule,
            clip_sample,
        )
        self.conditioner = NoteConditioner(embed_dim, max_notes)

    # -- to implement ----------------------------------------------------------------------------------
    def units(self, num_samples: int | Tensor) -> int | Tensor:
        raise NotImplementedError

    def to_model(self, audio: Tensor) -> Tensor:
        raise NotImplementedError

    def from_model(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _network(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    # -- shapes ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.conditioner.note.weight.device

    @property
    def max_samples(self) -> int:
        return self.max_notes * self.note_samples

    @property
    def max_units(self) -> int:
        return int(self.units(self.max_samples))

    def event_shape(self, units: int) -> tuple[int, ...]:
        raise NotImplementedError

    def mask_of(self, units: Tensor) -> Tensor:
        """The mask of clips `units` (B,) model-space units long: (B, 1, …, 1, max_units)."""
        valid = (torch.arange(self.max_units, device=units.device)[None, :] < units[:, None]).float()
        return valid.reshape(units.shape[0], *([1] * (len(self.event_shape(1)) - 1)), self.max_units)

    def units_of(self, mask: Tensor) -> Tensor:
        """(B,) real model-space units of each row of a mask."""
        return mask.reshape(mask.shape[0], -1, mask.shape[-1]).amax(1).sum(-1).round().long()

    # -- conditions ------------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return standard_scheduler(
            self.prediction_type, self.num_train_timesteps, self.beta_schedule, self.clip_sample
        )

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """`{"prompt": [...]}` → `{"tokens": (B, 2 + max_notes), "num_notes": (B,)}` (`prompts.tokenize`)."""
        if "prompt" not in batch:
            raise KeyError(
                f"{type(self).__name__} needs prompts under batch key 'prompt'; got keys {sorted(batch)}"
            )
        prompts = batch["prompt"]
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        tokens = tokenize(list(prompts), self.max_notes).to(self.device)
        return {"tokens": tokens, "num_notes": num_notes(tokens)}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        """Every slot empty (the durations, `num_notes`, are kept from `cond`)."""
        return {"tokens": torch.zeros_like(cond["tokens"])}

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor]:
        units = self.units(cond["num_notes"].to(self.device) * self.note_samples)
        mask = self.mask_of(units)
        shape = (len(cond), *self.event_shape(self.max_units))
        return masked_noise(shape, generator, mask, device=self.device), mask

    # -- the denoiser, once per clip length ------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        b, n = x_t.shape[0], x_t.shape[-1]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t
        units = torch.full((b,), n, device=x_t.device) if mask is None else self.units_of(mask)
        return run_by_length(lambda x, rows: self._network(x, t[rows], cond[rows]), x_t, units, self.multiple)

    # -- sample layout ---------------------------------------------------------------------------------
    def lengths_of(self, mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """(B,) real samples of decoded clips."""
        if mask is None:
            return torch.full((batch,), self.max_samples, dtype=torch.long, device=device)
        return (self.units_of(mask) * (self.max_samples // self.max_units)).clamp_max(self.max_samples)

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> AudioSamples:
        """Model space → `AudioSamples` (audio (B, 1, L) in [−1, 1] at `sample_rate`, lengths, padding
        zero); honours `window`, `random_window` and `sample_rate` requests (see `layout.apply_request`)."""
        lengths = self.lengths_of(mask, x0.shape[0], x0.device)
        # decode only up to the longest clip of the batch (Griffin–Lim costs per frame), then pad back
        units = int(self.units(int(lengths.max()))) if len(lengths) else self.max_units
        audio = self.from_model(x0[..., : max(1, units)])
        audio = F.pad(audio, (0, self.max_samples - audio.shape[-1]))[..., : self.max_samples]
        samples = AudioSamples(audio, self.sample_rate, lengths)
        return apply_request(samples, request) if request else samples

    def features(self, samples: AudioSamples) -> Tensor:
        """Diversity features of decoded clips (`core.guards`): the log-power spectrum (256-point STFT, hop
        128, 129 bins) averaged over each clip's real frames, then its std over those frames (B, 258).
        Unlike the raw waveform it ignores phase, so two takes of one note at shifted phase are close,
        while pitch, timbre and envelope changes move it; silent clips sit at the floor (log 1e-8)."""
        audio = samples.audio.detach().float().mean(1)  # (B, L) mono
        n_fft, hop = 256, 128
        spec = torch.stft(
            audio, n_fft, hop, window=torch.hann_window(n_fft, device=audio.device), return_complex=True
        )
        logp = torch.log10(spec.abs() ** 2 + 1e-8)  # (B, 129, T)
        frames = (samples.lengths.to(audio.device) // hop + 1).clamp(1, logp.shape[-1])
        real = (torch.arange(logp.shape[-1], device=audio.device)[None] < frames[:, None]).float()[:, None]
        mean = (logp * real).sum(-1) / real.sum(-1)
        std = (((logp - mean[..., None]) ** 2 * real).sum(-1) / real.sum(-1)).sqrt()
        return torch.cat([mean, std], dim=1)

    def encode(self, samples: Any) -> tuple[Tensor, Tensor]:
        """`AudioSamples`, a tensor (B, 1, L) / (B, L) of full clips, or a list of clips (C, L_i) / (L_i,)
        at `sample_rate` → (model space, mask); padding is exactly 0."""
        if isinstance(samples, AudioSamples):
            samples = resample(samples, self.sample_rate)
            audio, lengths = samples.audio, samples.lengths
        elif isinstance(samples, Tensor):
            audio = samples.float()
            audio = audio[:, None] if audio.dim() == 2 else audio
            lengths = torch.full((audio.shape[0],), audio.shape[-1], dtype=torch.long)
        elif isinstance(samples, (list, tuple)) and samples:
            clips = [torch.as_tensor(c).float() for c in samples]
            clips = [c[None] if c.dim() == 1 else c for c in clips]
            audio, _ = pad_stack(clips, axis=1)
            lengths = torch.tensor([c.shape[-1] for c in clips])
        else:
            raise TypeError(
                f"{type(self).__name__}.encode takes AudioSamples, a (B, 1, L) tensor or a list of clips; "
                f"got {type(samples).__name__}"
            )
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(
                f"the audio backbones are mono: expected (B, 1, L) clips, got {tuple(audio.shape)}"
            )
        if audio.shape[-1] > self.max_samples and int(lengths.max()) > self.max_samples:
            raise ValueError(
                f"a clip has {int(lengths.max())} samples; this model holds at most {self.max_samples} "
                f"({self.max_notes} notes of {self.note_samples} at {self.sample_rate} Hz)"
            )
        audio = F.pad(audio, (0, max(0, self.max_samples - audio.shape[-1])))[..., : self.max_samples]
        lengths = lengths.to(audio.device)
        keep = (
            torch.arange(self.max_samples, device=audio.device)[None, None] < lengths[:, None, None]
        ).float()
        audio = (audio * keep).to(self.device)
        mask = self.mask_of(self.units(lengths.to(self.device)))
        x = self.to_model(audio)
        return torch.where(mask.expand_as(x) > 0, x, torch.zeros_like(x)), mask


def run_by_length(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, units: Tensor, multiple: int) -> Tensor:
    """`fn(x[rows, ..., :n], rows)` once per distinct length n in `units` (rounded up to `multiple`,
    at most x's length), zero-padded back to x's length along the last dim."""
    total = x.shape[-1]
    lengths = torch.clamp(-(-units // multiple) * multiple, max=total)
    distinct = lengths.unique().tolist()
    if len(distinct) == 1 and distinct[0] == total:
        return fn(x, torch.arange(x.shape[0], device=x.device))
    out = torch.zeros_like(x)
    for n in distinct:
        rows = (lengths == n).nonzero().flatten()
        if n <= 0:
            continue
        part = fn(x[rows][..., :n], rows)
        out = out.index_copy(0, rows, F.pad(part, (0, total - n)))
    return out


# ---------------------------------------------------------------------------------------------------
# Mel-spectrogram diffusion
# ---------------------------------------------------------------------------------------------------
class MelBackbone(AudioBackbone):
    """Diffusion on mel spectrograms with a diffusers `UNet2DConditionModel`, decoded by Griffin–Lim.

    Model space: (B, 1, n_mels, T) log-mel in [−1, 1] (`mel.MelCodec`: 32 mel bands, 100–2500 Hz,
    hop 128 at 8 kHz, so a note of 2048 samples is 16 frames), T = max_notes × 16. The mask is
    (B, 1, 1, T): the time axis (`variable_axis` 2) varies.

    Conditioning: the UNet cross-attends to the token slots (`NoteConditioner`: timbre, loudness, notes)
    and adds their mean to its time embedding (diffusers' "projection" class embedding); besides, the
    note that sounds at each frame enters as `roll_channels` extra input channels, each a learned profile
    over the mel bands (a melody's notes are placed in time, and a note in frequency: convolutions and
    attention without position codes cannot tell one mel band from another, so a roll constant over the
    bands left the model no cue where a prompted pitch lies).

    Args:
        sample_rate, note_samples, max_notes: see the module docstring.
        n_mels, f_min, f_max, hop_length, n_fft, griffin_lim_iters: the mel representation.
        block_out_channels, layers_per_block, attention_head_dim, norm_num_groups: the UNet.
        embed_dim: width of the condition embeddings (the UNet's cross_attention_dim).
        roll_channels: extra input channels of time-aligned note profiles over the mel bands (0: none).
        prediction_type: "epsilon", "v_prediction", "sample" (DDPM schedule) or "flow".
        num_train_timesteps, beta_schedule, clip_sample: the noise schedule.
        weights: safetensors weights (path or pkg:// spec; default the shipped model, None: random).
    """

    variable_axis = 2

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        note_samples: int = NOTE_SAMPLES,
        max_notes: int = MAX_NOTES,
        n_mels: int = 32,
        f_min: float = 100.0,
        f_max: float = 2500.0,
        n_fft: int = 512,
        hop_length: int = 128,
        griffin_lim_iters: int = 32,
        block_out_channels: Sequence[int] = (32, 48),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        embed_dim: int = 32,
        roll_channels: int = 4,
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = True,
        weights: str | None = MEL_BASE_WEIGHTS,
    ) -> None:
        super().__init__(
            sample_rate, note_samples, max_notes, prediction_type, num_train_timesteps, beta_schedule,
            clip_sample, embed_dim,
        )  # fmt: skip
        from diffusers import UNet2DConditionModel

        if note_samples % hop_length:
            raise ValueError(f"note_samples {note_samples} must be a multiple of hop_length {hop_length}")
        # a list keeps the codec's fixed filterbanks out of state_dict (they are not weights)
        self._codec = [
            MelCodec(sample_rate, n_fft, hop_length, n_mels, f_min, f_max, n_iter=griffin_lim_iters)
        ]
        self.n_mels, self.hop_length = n_mels, hop_length
        n = len(block_out_channels)
        self.multiple = 2 ** (n - 1)
        self.roll_channels = roll_channels
        self.unet = UNet2DConditionModel(
            sample_size=n_mels,
            in_channels=1 + roll_channels,
            out_channels=1,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=embed_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=embed_dim,
        )
        self.roll = nn.Linear(embed_dim, roll_channels * n_mels) if roll_channels else None
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    @property
    def codec(self) -> MelCodec:
        return self._codec[0]

    def units(self, num_samples: int | Tensor) -> int | Tensor:
        return -(-num_samples // self.hop_length)

    def event_shape(self, units: int) -> tuple[int, ...]:
        return (1, self.n_mels, units)

    def to_model(self, audio: Tensor) -> Tensor:
        return self.codec.encode(audio)

    def from_model(self, x: Tensor) -> Tensor:
        return self.codec.decode(x)

    def _network(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        tokens = cond["tokens"]
        hidden = self.conditioner(tokens)
        inputs = [x]
        if self.roll is not None:
            frames = self.note_samples // self.hop_length
            slot = (torch.arange(x.shape[-1], device=x.device) // frames).clamp_max(self.max_notes - 1)
            roll = self.roll(self.conditioner.note_embedding(tokens))  # (B, notes, r · n_mels)
            roll = roll.unflatten(-1, (self.roll_channels, self.n_mels))[:, slot]  # (B, T, r, n_mels)
            inputs.append(roll.permute(0, 2, 3, 1).to(x.dtype))  # (B, r, n_mels, T)
        out = self.unet(torch.cat(inputs, 1), t, encoder_hidden_states=hidden, class_labels=hidden.mean(1))
        return out.sample


# ---------------------------------------------------------------------------------------------------
# Waveform diffusion
# ---------------------------------------------------------------------------------------------------
class WaveformBackbone(AudioBackbone):
    """Diffusion on raw waveforms with a diffusers `UNet1DModel` (the Dance Diffusion UNet).

    Model space: (B, 1, L) = `scale` × the waveform (L = max_notes × note_samples); the mask is
    (B, 1, L) (`variable_axis` 1). The UNet's Gaussian Fourier time features (of t / num_train_timesteps)
    are concatenated to its input (hence `extra_in_channels` = 2 × block_out_channels[0]); the condition
    enters as `cond_channels` extra input channels at every sample: the embedding of the note sounding
    there plus the timbre and loudness embeddings (`NoteConditioner`), projected.

    Args:
        sample_rate, note_samples, max_notes: see the module docstring.
        block_out_channels: UNet1D widths (3 levels; a level of ≥ 32 channels may use attention blocks).
        down_block_types, up_block_types, mid_block_type: diffusers UNet1D block names.
        embed_dim, cond_channels: condition embedding width and the input channels it is projected to.
        scale: model space = scale × waveform (the notes' waveforms are small next to unit noise).
        prediction_type, num_train_timesteps, beta_schedule, clip_sample: the noise schedule.
        weights: safetensors weights (path or pkg:// spec; default the shipped model, None: random).
    """

    variable_axis = 1

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        note_samples: int = NOTE_SAMPLES,
        max_notes: int = MAX_NOTES,
        block_out_channels: Sequence[int] = (16, 16, 32),
        down_block_types: Sequence[str] = ("DownBlock1DNoSkip", "DownBlock1D", "DownBlock1D"),
        up_block_types: Sequence[str] = ("UpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
        mid_block_type: str = "UNetMidBlock1D",
        embed_dim: int = 32,
        cond_channels: int = 8,
        scale: float = 3.0,
        prediction_type: PredictionType = "flow",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = False,
        weights: str | None = WAVE_BASE_WEIGHTS,
    ) -> None:
        super().__init__(
            sample_rate, note_samples, max_notes, prediction_type, num_train_timesteps, beta_schedule,
            clip_sample, embed_dim,
        )  # fmt: skip
        from diffusers import UNet1DModel

        if len(block_out_channels) != len(down_block_types) or len(down_block_types) != len(up_block_types):
            raise ValueError(
                "block_out_channels, down_block_types and up_block_types need one entry per level"
            )
        downsamples = sum(t != "DownBlock1DNoSkip" for t in down_block_types) + (
            mid_block_type == "UNetMidBlock1D"
        )
        self.multiple = 2**downsamples
        if note_samples % self.multiple:
            raise ValueError(
                f"note_samples {note_samples} must be a multiple of {self.multiple} for this UNet"
            )
        self.scale, self.cond_channels = float(scale), cond_channels
        self.unet = UNet1DModel(
            sample_size=self.max_notes * note_samples,
            in_channels=1 + cond_channels,
            out_channels=1,
            extra_in_channels=2 * block_out_channels[0],
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            mid_block_type=mid_block_type,
            time_embedding_type="fourier",
            flip_sin_to_cos=True,
            use_timestep_embedding=False,
        )
        self.project = nn.Linear(embed_dim, cond_channels)
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    def units(self, num_samples: int | Tensor) -> int | Tensor:
        return num_samples

    def event_shape(self, units: int) -> tuple[int, ...]:
        return (1, units)

    def to_model(self, audio: Tensor) -> Tensor:
        return audio.float() * self.scale

    def from_model(self, x: Tensor) -> Tensor:
        return (x.float() / self.scale).clamp(-1, 1)

    def _network(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        tokens = cond["tokens"]
        slot = (torch.arange(x.shape[-1], device=x.device) // self.note_samples).clamp_max(self.max_notes - 1)
        per_note = (
            self.conditioner.note_embedding(tokens) + self.conditioner.global_embedding(tokens)[:, None]
        )
        channels = self.project(per_note)[:, slot].transpose(1, 2).to(x.dtype)  # (B, cond_channels, L)
        return self.unet(torch.cat([x, channels], 1), t.float() / self.num_train_timesteps).sample
