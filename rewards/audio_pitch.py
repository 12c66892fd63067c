"""A pure-torch YIN pitch tracker (de Cheveigné & Kawahara, "YIN, a fundamental frequency estimator for
speech and music", JASA 2002), batched over clips.

Per frame of `window_s` seconds every `hop_s` seconds:

1. the difference function d(τ) = Σ_j (x_j − x_{j+τ})² for τ = 0 … sr/f_min, from one FFT
   cross-correlation and running sums of squares (d(τ) = e₀ + e_τ − 2·r(τ));
2. the cumulative mean normalised difference d′(τ) = d(τ) / ((1/τ)·Σ_{k≤τ} d(k)), d′(0) = 1;
3. the absolute threshold: the first τ ≥ sr/f_max with d′(τ) < `threshold`, then on to the bottom of
   that dip (its local minimum); without such a τ, the global minimum (the frame is then unvoiced);
4. parabolic interpolation of the raw d around τ for a sub-sample period (d′ would bias it, as the
   paper notes); f0 = sr / τ.

Step 3 is what avoids the octave errors of picking the peak of the autocorrelation (torchaudio's
`detect_pitch_frequency` reads 219 Hz for both 220 and 440 Hz): d′ dips first at the true period,
before its multiples, and d′ at half the period stays high unless the signal really repeats there.
A frame is voiced when its aperiodicity d′(τ) is below `voicing_threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PitchTrack:
    """Per-frame results (B, N): f0 in Hz, aperiodicity d′(τ) (0 periodic … 1 noise), voiced flags; and
    where each frame starts and ends (N,) in samples (a frame spans its window plus the longest lag)."""

    f0: Tensor
    aperiodicity: Tensor
    voiced: Tensor
    starts: Tensor
    ends: Tensor


def yin(
    audio: Tensor,
    sample_rate: int,
    f_min: float = 60.0,
    f_max: float = 2000.0,
    window_s: float = 0.032,
    hop_s: float = 0.008,
    threshold: float = 0.15,
    voicing_threshold: float = 0.3,
) -> PitchTrack:
    """YIN over mono clips (B, L) or (B, 1, L); see the module docstring. Needs L ≥ window + sr/f_min."""
    x = audio.detach().float()
    if x.dim() == 3:
        x = x.mean(1)
    if x.dim() != 2:
        raise ValueError(f"yin expects audio (B, L) or (B, C, L), got {tuple(audio.shape)}")
    if not 0 < f_min < f_max < sample_rate / 2:
        raise ValueError(f"need 0 < f_min < f_max < sample_rate / 2, got {f_min}, {f_max}, {sample_rate}")
    win = max(8, int(round(window_s * sample_rate)))
    hop = max(1, int(round(hop_s * sample_rate)))
    tau_max = int(sample_rate / f_min)
    tau_min = max(2, int(sample_rate / f_max))
    need = win + tau_max + 1
    if x.shape[-1] < need:
        x = F.pad(x, (0, need - x.shape[-1]))
    frames = x.unfold(-1, need, hop)  # (B, N, need)
    head = frames[..., :win]
    nfft = 1 << int(need + win).bit_length()
    r = torch.fft.irfft(torch.fft.rfft(head, nfft).conj() * torch.fft.rfft(frames, nfft), nfft)[
        ..., : tau_max + 1
    ]
    sq = F.pad(frames**2, (1, 0)).cumsum(-1)
    e0 = sq[..., win : win + 1]
    e_tau = sq[..., win : win + tau_max + 1] - sq[..., : tau_max + 1]
    d = (e0 + e_tau - 2 * r).clamp_min(0)
    tau = torch.arange(tau_max + 1, device=x.device)
    running = d[..., 1:].cumsum(-1) / tau[1:]
    dn = torch.cat([torch.ones_like(d[..., :1]), d[..., 1:] / running.clamp_min(1e-12)], -1)
    dn = torch.where(e0 > 1e-10, dn, torch.ones_like(dn))  # a silent frame is aperiodic
    valid = tau >= tau_min
    below = (dn < threshold) & valid
    has_dip = below.any(-1)
    first = torch.where(
        has_dip, below.float().argmax(-1), torch.where(valid, dn, torch.full_like(dn, 9.0)).argmin(-1)
    )
    rising = torch.cat([dn[..., 1:] >= dn[..., :-1], torch.ones_like(dn[..., :1], dtype=torch.bool)], -1)
    t0 = (rising & (tau >= first[..., None])).float().argmax(-1).clamp(1, tau_max - 1)
    aperiodicity = dn.gather(-1, t0[..., None])[..., 0]
    y0, y1, y2 = (d.gather(-1, (t0 + k)[..., None])[..., 0] for k in (-1, 0, 1))
    curve = y0 - 2 * y1 + y2
    offset = torch.where(curve.abs() > 1e-9, 0.5 * (y0 - y2) / curve, torch.zeros_like(curve)).clamp(-1, 1)
    f0 = sample_rate / (t0.float() + offset)
    starts = torch.arange(frames.shape[1], device=x.device) * hop
    return PitchTrack(
        f0=f0,
        aperiodicity=aperiodicity,
        voiced=aperiodicity < voicing_threshold,
        starts=starts,
        ends=starts + need,
    )


def segment_pitch(
    track: PitchTrack, lengths: Tensor, counts: list[int]
) -> tuple[list[list[float]], list[list[float]]]:
    """Median f0 of the voiced frames inside each of `counts[i]` equal segments of clip i (frames that
    reach across a segment border or past the clip's end are left out); NaN for a segment without a
    voiced frame. Returns (f0s per clip, voiced fraction per clip's segments)."""
    out, voiced_share = [], []
    for i, (n, k) in enumerate(zip(lengths.tolist(), counts, strict=True)):
        seg = n / max(1, k)
        f0s, shares = [], []
        for j in range(k):
            lo, hi = j * seg, (j + 1) * seg
            inside = (track.starts >= lo) & (track.ends <= hi)
            voiced = inside & track.voiced[i]
            shares.append(float(voiced.sum()) / max(1, int(inside.sum())))
            f0s.append(float(track.f0[i][voiced].median()) if voiced.any() else float("nan"))
        out.append(f0s)
        voiced_share.append(shares)
    return out, voiced_share
