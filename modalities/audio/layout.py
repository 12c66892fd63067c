"""The audio sample layout: what every audio backbone's `decode` returns and every audio reward reads.

`AudioSamples` holds

- `audio`: float (B, C, L) in [−1, 1] (C = 1, mono, for the embedded models), exactly 0 after each
  clip's end;
- `lengths`: long (B,), the real samples of each clip (padding is explicit: `mask` is (B, 1, L), 1 on
  real samples);
- `sample_rate`: int, Hz, one rate for the batch.

It is a `core.types.Batch`: `samples["audio"]` or `samples.audio` read a field; a slice, a list of
rows or a bool tensor select rows (`samples[1:3]`, `samples.index([0, 2])`); `AudioSamples.cat`,
`.to(device)` and `.detach()` act on every field. An int selects ONE clip as a plain tensor (C, L_i),
cut to its length (`samples[i]`), which is what a list of clips would give: `diffalign feedback` saves
clips that way and `encode` takes a list of such clips back.

`crop_window` and `resample` implement the decode requests of audio rewards (`{"window": [start_s,
end_s]}`, `{"sample_rate": 16000}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffalign.core.types import Batch


class AudioSamples(Batch):
    """Decoded clips (see the module docstring).

    Args:
        audio: (B, C, L) float waveforms in [−1, 1] (B, L is read as mono).
        sample_rate: Hz.
        lengths: (B,) real samples per clip (default: all L); samples after a clip's end are zeroed.
    """

    def __init__(
        self, audio: Tensor, sample_rate: int, lengths: Tensor | Sequence[int] | None = None
    ) -> None:
        audio = torch.as_tensor(audio)
        if audio.dim() == 2:
            audio = audio[:, None]
        if audio.dim() != 3:
            raise ValueError(f"AudioSamples expects audio (B, C, L), got shape {tuple(audio.shape)}")
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        b, _, n = audio.shape
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=audio.device)
        lengths = torch.as_tensor(lengths, device=audio.device).long().reshape(-1)
        if lengths.shape[0] != b or bool(((lengths < 0) | (lengths > n)).any()):
            raise ValueError(f"lengths must be {b} values in [0, {n}], got {lengths.tolist()}")
        keep = torch.arange(n, device=audio.device)[None, None, :] < lengths[:, None, None]
        super().__init__({"audio": audio * keep, "lengths": lengths, "sample_rate": int(sample_rate)})

    @property
    def audio(self) -> Tensor:
        return self._entries["audio"]

    @property
    def lengths(self) -> Tensor:
        return self._entries["lengths"]

    @property
    def sample_rate(self) -> int:
        return self._entries["sample_rate"]

    @property
    def mask(self) -> Tensor:
        """(B, 1, L) float, 1 on real samples."""
        n = self.audio.shape[-1]
        return (
            torch.arange(n, device=self.audio.device)[None, None, :] < self.lengths[:, None, None]
        ).float()

    @property
    def durations(self) -> Tensor:
        """(B,) seconds of real audio."""
        return self.lengths.float() / self.sample_rate

    def clip(self, i: int) -> Tensor:
        """Clip i as (C, L_i), cut to its length."""
        return self.audio[i, :, : int(self.lengths[i])]

    def clips(self) -> list[Tensor]:
        return [self.clip(i) for i in range(len(self))]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(self) <= key < len(self):
                raise IndexError(f"clip {key} is out of range for {len(self)} clips")
            return self.clip(key % len(self))
        return super().__getitem__(key)


def crop_window(samples: AudioSamples, start_s: float, end_s: float) -> AudioSamples:
    """The part of every clip between `start_s` and `end_s` seconds (the same window for every row):
    audio (B, C, W) with W = round((end_s − start_s)·rate); a clip that ends inside the window is
    shorter (its length counts only its real samples, possibly 0)."""
    if not 0 <= start_s < end_s:
        raise ValueError(f"a window needs 0 <= start < end seconds, got [{start_s}, {end_s}]")
    sr = samples.sample_rate
    a, w = int(round(start_s * sr)), int(round((end_s - start_s) * sr))
    audio = samples.audio
    if a + w > audio.shape[-1]:
        audio = torch.nn.functional.pad(audio, (0, a + w - audio.shape[-1]))
    lengths = (samples.lengths - a).clamp(0, w)
    return AudioSamples(audio[..., a : a + w], sr, lengths)


def random_windows(
    samples: AudioSamples, duration_s: float, generator: torch.Generator | None
) -> AudioSamples:
    """A window of `duration_s` seconds per clip at a random start inside its real audio (drawn from
    `generator`; a clip shorter than the window starts at 0)."""
    sr = samples.sample_rate
    w = int(round(duration_s * sr))
    if w < 1:
        raise ValueError(f"a random window needs a positive duration, got {duration_s} s")
    rows, lengths = [], []
    audio = torch.nn.functional.pad(samples.audio, (0, w))
    for i, n in enumerate(samples.lengths.tolist()):
        room = max(0, n - w)
        a = int(torch.randint(0, room + 1, (), generator=generator)) if room else 0
        rows.append(audio[i, :, a : a + w])
        lengths.append(min(w, n - a))
    return AudioSamples(torch.stack(rows), sr, torch.tensor(lengths, device=audio.device))


def resample(samples: AudioSamples, sample_rate: int) -> AudioSamples:
    """Every clip at `sample_rate` (torchaudio's band-limited sinc resampling; differentiable)."""
    import torchaudio

    sample_rate = int(sample_rate)
    if sample_rate == samples.sample_rate:
        return samples
    audio = torchaudio.functional.resample(samples.audio, samples.sample_rate, sample_rate)
    lengths = (samples.lengths.double() * sample_rate / samples.sample_rate).round().long()
    return AudioSamples(audio.clamp(-1, 1), sample_rate, lengths.clamp_max(audio.shape[-1]))


def apply_request(samples: AudioSamples, request: dict[str, Any]) -> AudioSamples:
    """Honour an audio reward's decode request (the keys every audio backbone documents):

    - `window`: [start_s, end_s] — that part of every clip (`crop_window`);
    - `random_window`: duration_s — a window at a random start per clip (`random_windows`, drawn from
      `request["generator"]`);
    - `sample_rate`: Hz — resampled (`resample`), after the window.

    Unknown keys raise a ValueError naming them.
    """
    request = dict(request)
    generator = request.pop("generator", None)
    unknown = set(request) - {"window", "random_window", "sample_rate"}
    if unknown:
        raise ValueError(
            f"audio decode takes window, random_window and sample_rate; got unknown {sorted(unknown)}"
        )
    if "window" in request and "random_window" in request:
        raise ValueError("ask for either a window or a random_window, not both")
    if "window" in request:
        window = request["window"]
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ValueError(f"window must be [start_s, end_s], got {window!r}")
        samples = crop_window(samples, float(window[0]), float(window[1]))
    if "random_window" in request:
        samples = random_windows(samples, float(request["random_window"]), generator)
    if "sample_rate" in request:
        samples = resample(samples, request["sample_rate"])
    return samples
