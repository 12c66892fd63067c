"""Loudness of clips: integrated loudness in LUFS (ITU-R BS.1770, pyloudnorm) and an RMS level in dB.

- `integrated_lufs` is the BS.1770 measure: K-weighting, 400 ms gating blocks with 75 % overlap, the
  −70 LUFS absolute and −10 LU relative gates (pyloudnorm's `Meter`). Clips shorter than one block are
  measured with a single block as long as the clip (BS.1770 defines no loudness for them; the embedded
  notes last 0.256 s). Silence (or a clip of no samples) reads `SILENCE_LUFS`.
- `rms_db` is 10·log10 of the mean square over the real samples (dB re full scale: a square wave of
  amplitude 1 reads 0 dB, a sine of amplitude 1 reads −3.01 dB): differentiable, no weighting, no gate.
  For a 1 kHz tone the two agree (BS.1770 is calibrated so), elsewhere they differ by the K-weighting
  (a few dB at most for the embedded notes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: what silence (or a clip below the −70 LUFS absolute gate) reads
SILENCE_LUFS = -70.0
BLOCK_SECONDS = 0.4


def _lengths(audio: Tensor, lengths: Tensor | None) -> list[int]:
    if lengths is None:
        return [audio.shape[-1]] * audio.shape[0]
    return [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]


def integrated_lufs(audio: Tensor, sample_rate: int, lengths: Tensor | None = None) -> Tensor:
    """Integrated loudness (B,) in LUFS of clips (B, C, L) (or (B, L)), each over its first `lengths[i]`
    samples. Not differentiable (pyloudnorm works on numpy arrays)."""
    import numpy as np
    import pyloudnorm

    x = audio.detach().float().cpu()
    if x.dim() == 2:
        x = x[:, None]
    if x.dim() != 3:
        raise ValueError(f"expected audio (B, C, L) or (B, L), got {tuple(audio.shape)}")
    out = []
    for clip, n in zip(x, _lengths(x, lengths), strict=True):
        if n < 2 or not bool(clip[:, :n].abs().max() > 0):
            out.append(SILENCE_LUFS)
            continue
        block = min(BLOCK_SECONDS, n / sample_rate)
        meter = pyloudnorm.Meter(sample_rate, block_size=block)
        value = meter.integrated_loudness(np.ascontiguousarray(clip[:, :n].T.numpy(), dtype=np.float64))
        out.append(max(SILENCE_LUFS, float(value)) if math.isfinite(value) else SILENCE_LUFS)
    return torch.tensor(out, dtype=torch.float32, device=audio.device)


def rms_db(audio: Tensor, lengths: Tensor | None = None, floor_db: float = -100.0) -> Tensor:
    """Differentiable RMS level (B,) in dB re full scale over the real samples of clips (B, C, L),
    floored at `floor_db` (silence)."""
    x = audio.float()
    if x.dim() == 2:
        x = x[:, None]
    n = x.shape[-1]
    if lengths is None:
        mask = torch.ones((x.shape[0], 1, n), device=x.device)
    else:
        lengths = torch.as_tensor(lengths, device=x.device).reshape(-1, 1, 1)
        mask = (torch.arange(n, device=x.device)[None, None, :] < lengths).float()
    power = (x**2 * mask).sum((1, 2)) / (mask.sum((1, 2)) * x.shape[1]).clamp_min(1.0)
    return 10.0 * torch.log10(power + 10.0 ** (floor_db / 10.0))
