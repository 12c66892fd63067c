"""Synthesized notes and melodies at known pitches: the embedded audio data, made in code.

A clip is one to three notes of `note_samples` samples each (0.256 s at 8 kHz), one timbre, one
loudness level:

- "sine", "square", "sawtooth": additive synthesis of the harmonics below 0.9 × Nyquist (square: odd
  harmonics at 1/k, sawtooth: every harmonic at 1/k), so nothing aliases; the phase of the
  fundamental is random (drawn from the generator);
- "plucked": a Karplus–Strong string: a burst of random ±1 values circulating in a delay line of one
  period with a two-tap averaging filter and a loss factor, tuned to the exact pitch with a
  linear-interpolation fractional delay;
- every note gets a 5 ms raised-cosine attack and a 20 ms release;
- the clip is scaled to its loudness level's LUFS target (`loudness.integrated_lufs`), then, if its
  peak would pass `PEAK`, scaled down to that peak (loud plucked strings end up slightly quieter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffalign.modalities.audio.loudness import integrated_lufs
from diffalign.modalities.audio.prompts import LOUDNESS_LUFS, parse_prompt

SAMPLE_RATE = 8000
NOTE_SAMPLES = 2048
PEAK = 0.95


def _harmonic_tone(harmonics: list[tuple[int, float]], f0: float, n: int, sr: int, phase: float) -> Tensor:
    t = torch.arange(n, dtype=torch.float64) / sr
    x = torch.zeros(n, dtype=torch.float64)
    for k, amp in harmonics:
        x += amp * torch.sin(2 * math.pi * k * f0 * t + k * phase)
    return x


def karplus_strong(
    f0: float, n: int, sr: int, generator: torch.Generator | None = None, loss: float = 0.996
) -> Tensor:
    """A plucked string at `f0` Hz: n samples of a Karplus–Strong loop (float64).

    y[i] = x[i] + loss · ½·[(1−f)·y[i−M] + y[i−M−1] + f·y[i−M−2]]: the two-tap averaging filter on a
    delay of M + f samples (linear interpolation), so that the loop delay M + f + ½ is the period sr/f0,
    excited by one period x of random ±1 values (an IIR filter, run by `scipy.signal.lfilter`).
    """
    import numpy as np
    from scipy.signal import lfilter

    period = sr / f0
    m = int(math.floor(period - 0.5))
    frac = period - 0.5 - m
    if m < 2:
        raise ValueError(f"{f0} Hz is too high for a Karplus–Strong string at {sr} Hz")
    burst = torch.randint(0, 2, (m + 2,), generator=generator, dtype=torch.float64) * 2 - 1
    x = np.zeros(n)
    x[: m + 2] = (burst - burst.mean()).numpy()
    a = np.zeros(m + 3)
    a[0] = 1.0
    a[m:] = [-loss * 0.5 * (1 - frac), -loss * 0.5, -loss * 0.5 * frac]
    return torch.from_numpy(lfilter([1.0], a, x))


def oscillator(
    timbre: str, f0: float, n: int, sample_rate: int = SAMPLE_RATE, generator: torch.Generator | None = None
) -> Tensor:
    """One note (n samples, float64, peak about 1) of `timbre` at `f0` Hz (see the module docstring)."""
    nyquist = 0.9 * sample_rate / 2
    if timbre == "plucked":
        x = karplus_strong(f0, n, sample_rate, generator)
    else:
        top = max(1, int(nyquist // f0))
        if timbre == "sine":
            harmonics = [(1, 1.0)]
        elif timbre == "square":
            harmonics = [(k, 1.0 / k) for k in range(1, top + 1, 2)]
        elif timbre == "sawtooth":
            harmonics = [(k, 1.0 / k) for k in range(1, top + 1)]
        else:
            raise ValueError(f"unknown timbre {timbre!r} (sine, square, sawtooth or plucked)")
        phase = float(torch.rand((), generator=generator, dtype=torch.float64)) * 2 * math.pi
        x = _harmonic_tone(harmonics, f0, n, sample_rate, phase)
    return x / x.abs().max().clamp_min(1e-12)


def envelope(n: int, sample_rate: int, attack_s: float = 0.005, release_s: float = 0.02) -> Tensor:
    """Raised-cosine attack and release ramps over n samples (float64)."""
    env = torch.ones(n, dtype=torch.float64)
    a, r = max(1, int(attack_s * sample_rate)), max(1, int(release_s * sample_rate))
    env[:a] = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, a, dtype=torch.float64))
    env[n - r :] = 0.5 + 0.5 * torch.cos(torch.linspace(0, math.pi, r, dtype=torch.float64))
    return env


def synthesize(
    prompt: Any,
    sample_rate: int = SAMPLE_RATE,
    note_samples: int = NOTE_SAMPLES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The clip a prompt describes, (1, k·note_samples) float32 in [−1, 1] (mono).

    A prompt without a timbre plays a sine, one without a level plays "medium".
    """
    ap = parse_prompt(prompt)
    timbre = ap.timbre or "sine"
    target = LOUDNESS_LUFS[ap.loudness or "medium"]
    env = envelope(note_samples, sample_rate)
    notes = [oscillator(timbre, f, note_samples, sample_rate, generator) * env for f in ap.frequencies]
    x = torch.cat(notes)[None]
    x = x / x.abs().max().clamp_min(1e-12) * 0.5
    level = float(integrated_lufs(x[None].float(), sample_rate)[0])
    x = x * 10 ** ((target - level) / 20)
    peak = float(x.abs().max())
    if peak > PEAK:
        x = x * (PEAK / peak)
    return x.float()
