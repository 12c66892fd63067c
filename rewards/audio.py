"""Rewards for audio in the audio modality's sample layout (`modalities.audio.layout.AudioSamples`:
audio (B, C, L) float in [−1, 1], lengths (B,), sample_rate).

What the prompt asks for is read from `cond["prompt"]` (text such as "a C4 square note, quiet" or a
dict, `modalities.audio.prompts.parse_prompt`); a melody's notes are taken to share its clip equally.

- `PitchAccuracy`: how close the pitch of each prompted note is, exp(−½·(cents error / σ)²) averaged
  over the notes (YIN, `audio_pitch.yin`; torchcrepe when asked and installed); 0 for a note with no
  voiced frame. Info: `note_accuracy` (share of notes within 50 cents: the right note), `voiced`.
- `LoudnessLUFS`: −|integrated loudness − target| in LU (ITU-R BS.1770 via pyloudnorm); the target is
  the prompt's level (`prompts.LOUDNESS_LUFS`) or a fixed `target_lufs`.
- `RMSLoudness`: the differentiable proxy, −√((RMS dB − target)² + 1) + 1 (a smooth |error| in dB).
- `SpectralFlatness`: the mean over frames of the Wiener entropy (geometric / arithmetic mean of the
  power spectrum; 0 for a pure tone, e^−γ ≈ 0.56 for white noise), negated by default (tonal audio
  scores higher); differentiable.
- `ClippingRatio`: −(share of real samples with |x| ≥ `threshold`).
- `NoiseFloor`: −(noise floor in dB re full scale): the median over frames of the median over
  frequency bins of the power spectrum (scaled so white noise of variance σ² reads 10·log10(σ²·ln 2)).
- `TimbreFidelity`: the probability the shipped timbre classifier gives the prompted timbre
  (differentiable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond
from diffalign.modalities.audio.layout import AudioSamples
from diffalign.modalities.audio.loudness import integrated_lufs, rms_db
from diffalign.modalities.audio.prompts import AudioPrompt, cents, parse_prompt
from diffalign.rewards.audio_pitch import segment_pitch, yin

#: the reader of audio files for `diffalign score` (every audio reward declares it)
AUDIO_READER = "diffalign.modalities.audio.io.AudioReader"


def as_audio(samples: Any, who: str) -> AudioSamples:
    """`samples` as `AudioSamples` (a mapping with audio, sample_rate and optional lengths is wrapped);
    anything else raises naming the reward."""
    if isinstance(samples, AudioSamples):
        return samples
    if isinstance(samples, Mapping) and "audio" in samples and "sample_rate" in samples:
        return AudioSamples(samples["audio"], int(samples["sample_rate"]), samples.get("lengths"))
    raise ValueError(
        f"{who} scores audio samples (AudioSamples: audio (B, C, L), lengths, sample_rate), "
        f"got {type(samples).__name__}"
    )


def prompted(cond: Cond, batch_size: int, who: str) -> list[AudioPrompt]:
    """The parsed prompt of every row (`cond["prompt"]`); a missing or unparsable prompt raises."""
    prompts = cond.get("prompt") if cond is not None else None
    if prompts is None or isinstance(prompts, Tensor) or len(prompts) != batch_size:
        raise KeyError(
            f"{who} reads what each sample was asked for from cond['prompt'] (one audio prompt per sample, "
            f"e.g. 'a C4 square note, quiet'); got keys {sorted(cond) if cond is not None else []}"
        )
    return [parse_prompt(p) for p in prompts]


class PitchAccuracy(Reward):
    """How well each prompted note's pitch is hit (see the module docstring).

    Args:
        sigma_cents: σ of the Gaussian score in cents (50: a semitone off scores e^−2 ≈ 0.14).
        tracker: "yin" (pure torch, always available) or "crepe" (torchcrepe, if installed: its weights
            ship in the package).
        f_min, f_max: pitch search range in Hz.
    """

    reader = AUDIO_READER

    def __init__(
        self,
        sigma_cents: float = 50.0,
        tracker: Literal["yin", "crepe"] = "yin",
        f_min: float = 60.0,
        f_max: float = 2000.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name or "pitch_accuracy")
        if tracker not in ("yin", "crepe"):
            raise ValueError(f"tracker must be 'yin' or 'crepe', got {tracker!r}")
        if tracker == "crepe":
            try:
                import torchcrepe  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "PitchAccuracy(tracker='crepe') needs torchcrepe: pip install torchcrepe"
                ) from e
        self.sigma, self.tracker, self.f_min, self.f_max = sigma_cents, tracker, f_min, f_max

    def note_pitches(self, samples: AudioSamples, counts: list[int]) -> list[list[float]]:
        """The measured f0 (Hz, NaN when unvoiced) of each of `counts[i]` equal segments of clip i."""
        if self.tracker == "crepe":
            return self._crepe(samples, counts)
        track = yin(
            samples.audio, samples.sample_rate, self.f_min, min(self.f_max, 0.45 * samples.sample_rate)
        )
        return segment_pitch(track, samples.lengths, counts)[0]

    def _crepe(self, samples: AudioSamples, counts: list[int]) -> list[list[float]]:
        import torchcrepe

        from diffalign.modalities.audio.layout import resample

        s16 = resample(samples, 16000)
        out = []
        for i, k in enumerate(counts):
            clip = s16.clip(i).mean(0, keepdim=True)
            f0, periodicity = torchcrepe.predict(
                clip, 16000, 160, self.f_min, self.f_max, "tiny", return_periodicity=True, device=clip.device
            )
            seg = f0.shape[-1] / max(1, k)
            notes = []
            for j in range(k):
                part = f0[0, int(j * seg) : int((j + 1) * seg)]
                voiced = periodicity[0, int(j * seg) : int((j + 1) * seg)] > 0.5
                notes.append(float(part[voiced].median()) if voiced.any() else float("nan"))
            out.append(notes)
        return out

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        prompts = prompted(cond, len(audio), self.name)
        pitches = self.note_pitches(audio, [len(p.notes) for p in prompts])
        scores, accurate, voiced = [], [], []
        for p, measured in zip(prompts, pitches, strict=True):
            per_note, hit, ok = [], [], []
            for f, target in zip(measured, p.frequencies, strict=True):
                if math.isnan(f):
                    per_note.append(0.0)
                    hit.append(0.0)
                    ok.append(0.0)
                    continue
                c = float(cents(f, target))
                per_note.append(math.exp(-0.5 * (c / self.sigma) ** 2))
                hit.append(float(abs(c) < 50.0))
                ok.append(1.0)
            scores.append(sum(per_note) / len(per_note))
            accurate.append(sum(hit) / len(hit))
            voiced.append(sum(ok) / len(ok))
        dev = audio.audio.device
        return RewardOutput(
            scores=torch.tensor(scores, device=dev),
            info={
                "note_accuracy": torch.tensor(accurate, device=dev),
                "voiced": torch.tensor(voiced, device=dev),
            },
        )


def _targets(prompts: list[AudioPrompt] | None, fixed: float | None, n: int, who: str) -> list[float]:
    if fixed is not None:
        return [float(fixed)] * n
    assert prompts is not None
    missing = [i for i, p in enumerate(prompts) if p.lufs is None]
    if missing:
        raise ValueError(
            f"{who}: the prompt of sample {missing[0]} names no loudness level (quiet, medium, loud); "
            "give a fixed target instead"
        )
    return [float(p.lufs) for p in prompts]  # type: ignore[arg-type]


class LoudnessLUFS(Reward):
    """−|integrated loudness (LUFS) − target| in LU (see the module docstring).

    Args:
        target_lufs: a fixed target; None reads each prompt's level.
    """

    reader = AUDIO_READER

    def __init__(self, target_lufs: float | None = None, name: str | None = None) -> None:
        super().__init__(name or "loudness_lufs")
        self.target = target_lufs

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        prompts = None if self.target is not None else prompted(cond, len(audio), self.name)
        target = torch.tensor(
            _targets(prompts, self.target, len(audio), self.name), device=audio.audio.device
        )
        lufs = integrated_lufs(audio.audio, audio.sample_rate, audio.lengths)
        return RewardOutput(scores=-(lufs - target).abs(), info={"lufs": lufs})


class RMSLoudness(Reward):
    """Differentiable loudness proxy: −√((RMS dB − target)² + 1) + 1, the RMS level over the real samples
    (`loudness.rms_db`); 0 at the target, about −|error| far from it.

    Args:
        target_db: a fixed target in dB re full scale; None reads each prompt's level (its LUFS value,
            taken as dB RMS).
    """

    reader = AUDIO_READER
    differentiable = True

    def __init__(self, target_db: float | None = None, name: str | None = None) -> None:
        super().__init__(name or "rms_loudness")
        self.target = target_db

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        prompts = None if self.target is not None else prompted(cond, len(audio), self.name)
        target = torch.tensor(
            _targets(prompts, self.target, len(audio), self.name), device=audio.audio.device
        )
        level = rms_db(audio.audio, audio.lengths)
        score = 1.0 - torch.sqrt((level - target) ** 2 + 1.0)
        return RewardOutput(scores=score, info={"rms_db": level.detach()})


def power_frames(audio: AudioSamples, window_s: float = 0.064, hop_s: float = 0.016) -> tuple[Tensor, Tensor]:
    """Periodogram frames (B, N, K) of the mono mix, scaled so white noise of variance σ² has mean σ² per
    bin (|STFT|² / Σw²; Hann window, frames inside the signal only), and a (B, N) mask of frames that lie
    within each clip's real samples."""
    x = audio.audio.float().mean(1)
    sr = audio.sample_rate
    n_fft = max(16, int(round(window_s * sr)))
    hop = max(1, int(round(hop_s * sr)))
    if x.shape[-1] < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, center=False, return_complex=True)  # (B, K, N)
    power = (spec.real**2 + spec.imag**2).transpose(1, 2) / (window**2).sum()
    ends = torch.arange(power.shape[1], device=x.device) * hop + n_fft
    mask = (ends[None, :] <= audio.lengths.to(x.device)[:, None].clamp_min(n_fft)).float()
    return power, mask


class SpectralFlatness(Reward):
    """Wiener entropy of the power spectrum, averaged over frames with sound (see the module docstring).

    Args:
        prefer: "tonal" scores −flatness (pure tones best), "noisy" scores +flatness.
        silence_db: frames more than this far below the clip's loudest frame are left out.
    """

    reader = AUDIO_READER
    differentiable = True

    def __init__(
        self, prefer: Literal["tonal", "noisy"] = "tonal", silence_db: float = 50.0, name: str | None = None
    ) -> None:
        super().__init__(name or "spectral_flatness")
        if prefer not in ("tonal", "noisy"):
            raise ValueError(f"prefer must be 'tonal' or 'noisy', got {prefer!r}")
        self.prefer, self.silence_db = prefer, silence_db

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        power, mask = power_frames(audio)
        eps = 1e-12
        flat = torch.exp(torch.log(power + eps).mean(-1)) / (power.mean(-1) + eps)  # (B, N)
        energy = 10 * torch.log10(power.mean(-1) + eps)
        loudest = torch.where(mask > 0, energy, torch.full_like(energy, -1e9)).amax(-1, keepdim=True)
        keep = mask * (energy > loudest - self.silence_db).float()
        flatness = (flat * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)
        return RewardOutput(
            scores=-flatness if self.prefer == "tonal" else flatness, info={"flatness": flatness.detach()}
        )


class ClippingRatio(Reward):
    """−(share of real samples with |x| ≥ `threshold`): 0 for audio that never reaches full scale.

    Args:
        threshold: the level counted as clipped.
    """

    reader = AUDIO_READER

    def __init__(self, threshold: float = 0.99, name: str | None = None) -> None:
        super().__init__(name or "clipping_ratio")
        self.threshold = threshold

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        m = audio.mask.expand_as(audio.audio)
        clipped = ((audio.audio.abs() >= self.threshold).float() * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(
            1.0
        )
        return RewardOutput(scores=-clipped, info={"clipped": clipped})


class NoiseFloor(Reward):
    """−(noise floor in dB re full scale), see the module docstring: a lower floor scores higher.

    Args:
        floor_db: what silence reads (the floor is clamped below at this level).
    """

    reader = AUDIO_READER

    def __init__(self, floor_db: float = -120.0, name: str | None = None) -> None:
        super().__init__(name or "noise_floor")
        self.floor_db = floor_db

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        power, mask = power_frames(audio)
        per_frame = power.median(-1).values  # (B, N)
        floors = []
        for row, m in zip(per_frame, mask, strict=True):
            vals = row[m > 0]
            floors.append(vals.median() if vals.numel() else row.new_tensor(0.0))
        floor = 10 * torch.log10(torch.stack(floors) + 10 ** (self.floor_db / 10))
        return RewardOutput(scores=-floor, info={"noise_floor_db": floor})


class TimbreFidelity(Reward):
    """Probability the timbre classifier gives the prompted timbre (differentiable).

    Args:
        weights: classifier weights (path or pkg:// spec; default the shipped classifier trained by
            `python -m diffalign.modalities.audio.train_timbre_classifier`).
        log_prob: score with the log-probability instead.
    """

    reader = AUDIO_READER
    differentiable = True

    def __init__(self, weights: str | None = None, log_prob: bool = False, name: str | None = None) -> None:
        super().__init__(name or "timbre_fidelity")
        from diffalign.modalities.audio.train_timbre_classifier import CLASSIFIER_WEIGHTS, load_classifier

        self.classifier = load_classifier(weights or CLASSIFIER_WEIGHTS)
        self.log_prob = log_prob

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        from diffalign.modalities.audio.prompts import TIMBRES

        audio = as_audio(samples, self.name)
        prompts = prompted(cond, len(audio), self.name)
        missing = [i for i, p in enumerate(prompts) if p.timbre is None]
        if missing:
            raise ValueError(f"{self.name}: the prompt of sample {missing[0]} names no timbre")
        target = torch.tensor([TIMBRES.index(p.timbre) for p in prompts], device=audio.audio.device)
        self.classifier.to(audio.audio.device)
        logp = self.classifier(audio.audio, audio.sample_rate, audio.lengths).log_softmax(-1)
        chosen = logp.gather(1, target[:, None])[:, 0]
        correct = (logp.argmax(-1) == target).float().detach()
        return RewardOutput(
            scores=chosen if self.log_prob else chosen.exp(), info={"timbre_accuracy": correct}
        )
