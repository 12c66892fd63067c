"""The mel-spectrogram representation and its fixed inverse.

Forward (`MelCodec.encode`): mono audio (B, 1, L) → the power STFT (Hann window of `n_fft` samples,
hop `hop_length`, centred frames, zeros before the start and after the end, unnormalised) → a
triangular HTK mel filterbank of `n_mels` bands between `f_min` and `f_max` → dB (10·log10) → clipped
to [`db_min`, `db_max`] and mapped linearly onto [−1, 1] (−1 is silence). A clip of L samples gives
T = ⌈L / hop_length⌉ frames (the centred frame at sample T·hop is dropped, so a note of 2048 samples
is exactly 16 frames).

Inverse (`MelCodec.decode`), fixed and deterministic: [−1, 1] → dB → power (minus the floor's power,
so −1 decodes to exact silence) → torchaudio's `InverseMelScale` (the least-squares linear spectrogram
under the filterbank, clipped at 0) → torchaudio's `GriffinLim` (`n_iter` iterations, momentum 0.99,
zero initial phase — `rand_init=False`, so the same mel always gives the same waveform) → T·hop_length
samples clipped to [−1, 1]. Every step is differentiable (reward backprop through decoding works).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MelCodec(nn.Module):
    """Mel spectrogram ↔ waveform with fixed settings (see the module docstring).

    Args:
        sample_rate: Hz of the waveforms.
        n_fft, hop_length: STFT window and hop in samples.
        n_mels, f_min, f_max: the mel filterbank.
        db_min, db_max: the dB range mapped onto [−1, 1].
        n_iter: Griffin–Lim iterations.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        n_fft: int = 512,
        hop_length: int = 128,
        n_mels: int = 32,
        f_min: float = 100.0,
        f_max: float = 3000.0,
        db_min: float = -40.0,
        db_max: float = 40.0,
        n_iter: int = 32,
    ) -> None:
        super().__init__()
        import torchaudio

        if not db_min < db_max:
            raise ValueError(f"need db_min < db_max, got {db_min}, {db_max}")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.db_min, self.db_max, self.n_iter = db_min, db_max, n_iter
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            n_mels=n_mels,
            f_min=f_min,
            f_max=f_max,
            power=2.0,
            pad_mode="constant",
        )
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max
        )
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=n_fft, hop_length=hop_length, power=2.0, n_iter=n_iter, momentum=0.99, rand_init=False
        )
        self.requires_grad_(False)

    def frames(self, num_samples: int | Tensor) -> int | Tensor:
        """Frames T = ⌈L / hop_length⌉ of a clip of L samples."""
        return -(-num_samples // self.hop_length)

    def encode(self, audio: Tensor) -> Tensor:
        """(B, 1, L) mono waveforms → (B, 1, n_mels, ⌈L / hop⌉) in [−1, 1] (differentiable)."""
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"MelCodec encodes mono audio (B, 1, L), got {tuple(audio.shape)}")
        t = self.frames(audio.shape[-1])
        power = self.mel.to(audio.device)(audio.float())[..., :t]
        db = 10.0 * torch.log10(power + 1e-10)
        return ((db.clamp(self.db_min, self.db_max) - self.db_min) / (self.db_max - self.db_min)) * 2 - 1

    def to_power(self, mel: Tensor) -> Tensor:
        """[−1, 1] values → mel power, 0 at −1 (silence)."""
        db = (mel.float().clamp(-1, 1) + 1) / 2 * (self.db_max - self.db_min) + self.db_min
        return (10.0 ** (db / 10.0) - 10.0 ** (self.db_min / 10.0)).clamp_min(0.0)

    def decode(self, mel: Tensor) -> Tensor:
        """(B, 1, n_mels, T) in [−1, 1] → (B, 1, T·hop_length) waveforms in [−1, 1] (Griffin–Lim)."""
        if mel.dim() != 4 or mel.shape[1] != 1 or mel.shape[2] != self.n_mels:
            raise ValueError(
                f"MelCodec decodes (B, 1, {self.n_mels}, T) mel spectrograms, got {tuple(mel.shape)}"
            )
        power = self.to_power(mel)
        power = torch.cat(
            [power, torch.zeros_like(power[..., :1])], dim=-1
        )  # the dropped last frame: silence
        linear = self.inverse_mel.to(mel.device)(power)
        from torchaudio.functional import griffinlim

        gl = self.griffin_lim
        audio = griffinlim(
            linear, gl.window.to(mel.device), gl.n_fft, gl.hop_length, gl.win_length, gl.power,
            gl.n_iter, gl.momentum, mel.shape[-1] * self.hop_length, gl.rand_init,
        )  # fmt: skip
        return audio.clamp(-1, 1)
