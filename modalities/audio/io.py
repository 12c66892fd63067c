"""Audio files and pictures of audio: WAV/FLAC through soundfile, log-mel spectrogram grids.

- `read_audio(path)` → (clip (C, L) float32 in [−1, 1], sample rate); `AudioReader`, the reader of
  `diffalign score` for a folder of WAV/FLAC/OGG files (or one file): one record per file in name
  order, an error row for a file that does not decode, batches in the layout the audio rewards take
  (`AudioSamples`, padded, lengths explicit); `read_audio_folder(folder)` iterates (file id,
  `AudioSamples` of one clip, or the error message) through the same reader.
- `write_wav(path, clip, sample_rate)` writes 16-bit PCM; `write_wavs(samples, folder)` one file per clip
  of an `AudioSamples`, cut to its length.
- `spectrogram_grid(rows, ...)` draws log-mel spectrograms (a fixed display transform: 48 mel bands up
  to the Nyquist frequency, hop of 8 ms, dB from the loudest bin −80 dB, magma colours), one row per
  label, one tile per clip, all tiles on one time axis (a shorter clip ends in grey).
  `SpectrogramGridWriter` keeps one such grid up to date batch by batch (`diffalign sample`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.core.functional import pad_stack
from diffalign.core.score.readers import Reader, ReadError, Record, relative_id
from diffalign.modalities.audio.layout import AudioSamples, resample

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
SPECTROGRAMS = "spectrograms.png"


def read_audio(path: str | os.PathLike[str]) -> tuple[Tensor, int]:
    """(clip (C, L) float32, sample rate) of an audio file (soundfile: WAV, FLAC, OGG, ...)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def load_audio(
    path: str | os.PathLike[str], mono: bool = True, sample_rate: int | None = None
) -> AudioSamples:
    """One audio file as `AudioSamples` of one clip (channels averaged when `mono`, resampled to
    `sample_rate` when given); raises ValueError naming the file when it does not decode or is empty."""
    name = Path(path).name
    try:
        clip, rate = read_audio(path)
    except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError, RuntimeError, ...
        raise ValueError(f"cannot read audio {name}: {type(e).__name__}: {e}") from None
    if clip.shape[-1] == 0:
        raise ValueError(f"cannot read audio {name}: the file has no samples")
    if mono:
        clip = clip.mean(0, keepdim=True)
    samples = AudioSamples(clip[None].clamp(-1, 1), rate)
    return resample(samples, sample_rate) if sample_rate else samples


class AudioReader(Reader):
    """Reads a folder of WAV/FLAC/OGG files (or one file) for `diffalign score` into the audio layout.

    One record per audio file, in name order (the folder itself only, unless `recursive`); the record id
    is the file's path relative to the folder (`a.wav`, `sub/b.flac`): the key of a `prompts.csv`
    (`file,prompt`) inside the folder, which the score command reads (or `--prompt TEXT`). Files with
    other suffixes are not records. `load` decodes a file into `AudioSamples` of one clip; `collate`
    pads the clips of a batch into one `AudioSamples` (lengths explicit) — clips of different sample
    rates cannot share a batch, so such a batch is scored one file at a time.

    Args:
        recursive: also read audio files in subfolders.
        mono: average the channels (the audio models and the timbre classifier are mono).
        sample_rate: resample every file to this rate (Hz); None keeps each file's rate.
    """

    source_column = "path"
    suffixes = (*AUDIO_SUFFIXES, "/")
    chunk_size = 16

    def __init__(self, recursive: bool = False, mono: bool = True, sample_rate: int | None = None) -> None:
        if sample_rate is not None and int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        self.recursive, self.mono = bool(recursive), bool(mono)
        self.sample_rate = None if sample_rate is None else int(sample_rate)

    def records(self, path: Path) -> Iterator[Record]:
        path = Path(path)
        if path.is_file():
            return iter([Record(path.name, payload=str(path), source=str(path))])
        try:
            files = sorted(self._files(path), key=lambda p: relative_id(p, path))
        except OSError as e:
            raise ReadError(f"cannot list {path}: {e}") from None
        return (Record(relative_id(f, path), payload=str(f), source=str(f)) for f in files)

    def _files(self, folder: Path) -> Iterator[Path]:
        walk = os.walk(folder) if self.recursive else [(str(folder), [], os.listdir(folder))]
        for root, _, names in walk:
            for name in names:
                p = Path(root) / name
                if name.lower().endswith(AUDIO_SUFFIXES) and p.is_file():
                    yield p

    def load(self, payload: Any) -> AudioSamples:
        return load_audio(payload, self.mono, self.sample_rate)

    def collate(self, samples: list[AudioSamples]) -> AudioSamples:
        rates = {s.sample_rate for s in samples}
        if len(rates) > 1:
            raise ValueError(f"clips at {len(rates)} different sample rates cannot form one batch")
        channels = {s.audio.shape[1] for s in samples}
        if len(channels) > 1:
            raise ValueError(f"clips with {len(channels)} different channel counts cannot form one batch")
        audio, _ = pad_stack([s.audio[0] for s in samples], axis=1)
        return AudioSamples(audio, rates.pop(), torch.cat([s.lengths for s in samples]))


def read_audio_folder(folder: str | os.PathLike[str], mono: bool = True) -> Iterator[tuple[str, Any]]:
    """(relative path, `AudioSamples` of the one clip, or an error string) for every audio file under
    `folder` (subfolders too) in sorted order, read by `AudioReader`. `mono` averages channels."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    reader = AudioReader(recursive=True, mono=mono)
    for record in reader.records(root):
        try:
            yield record.id, reader.load(record.payload)
        except ValueError as e:  # an unreadable file is a row with its error
            yield record.id, str(e)


def write_wav(path: str | os.PathLike[str], clip: Tensor, sample_rate: int) -> Path:
    """Write a clip (C, L) or (L,) in [−1, 1] as 16-bit PCM WAV (atomically)."""
    import soundfile

    from diffalign.core.io import atomic_write

    x = clip.detach().float().cpu().clamp(-1, 1)
    x = x[None] if x.dim() == 1 else x
    data = x.T.numpy()
    return atomic_write(
        path, lambda p: soundfile.write(str(p), data, int(sample_rate), subtype="PCM_16", format="WAV")
    )


def write_wavs(samples: AudioSamples, folder: str | os.PathLike[str], start_index: int = 0) -> list[Path]:
    """One WAV per clip, `folder/<start_index + i:06d>.wav`, each cut to its length."""
    folder = Path(folder)
    return [
        write_wav(folder / f"{start_index + i:06d}.wav", samples.clip(i), samples.sample_rate)
        for i in range(len(samples))
    ]


# ---------------------------------------------------------------------------------------------------
# Spectrogram pictures
# ---------------------------------------------------------------------------------------------------
def display_spectrogram(clip: Tensor, sample_rate: int, frames: int | None = None) -> np.ndarray:
    """A log-mel spectrogram of a mono clip (L,) or (1, L) as an RGB uint8 array (48, frames, 3), low
    frequencies at the bottom; frames beyond the clip (when `frames` is given) are grey."""
    import torchaudio
    from matplotlib import colormaps

    x = clip.detach().float().cpu().reshape(-1)
    hop = max(1, int(round(0.008 * sample_rate)))
    n_fft = 1 << max(6, int(np.ceil(np.log2(4 * hop))))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate, n_fft=n_fft, hop_length=hop, n_mels=48, f_min=0.0, f_max=sample_rate / 2, power=2.0
    )
    n = max(1, -(-x.shape[0] // hop))
    power = mel(x if x.shape[0] >= n_fft // 2 + 1 else torch.nn.functional.pad(x, (0, n_fft)))[:, :n]
    db = 10 * torch.log10(power + 1e-12)
    db = (db - db.max()).clamp(min=-80.0) / 80.0 + 1.0  # [0, 1]: 0 is 80 dB below the loudest bin
    rgb = (colormaps["magma"](db.flip(0).numpy())[..., :3] * 255).astype(np.uint8)
    width = frames or rgb.shape[1]
    out = np.full((rgb.shape[0], width, 3), 128, dtype=np.uint8)
    out[:, : min(width, rgb.shape[1])] = rgb[:, :width]
    return out


def spectrogram_grid(
    rows: Sequence[tuple[str, Sequence[Tensor]]], sample_rate: int, title: str | None = None, scale: int = 2
) -> Any:
    """A PIL image: one row of spectrogram tiles per (label, clips) entry, the label on the left, on one
    time axis (the longest clip of the grid sets the tile width)."""
    from PIL import Image, ImageDraw

    hop = max(1, int(round(0.008 * sample_rate)))
    longest = max([int(c.shape[-1]) for _, clips in rows for c in clips] + [hop])
    frames = -(-longest // hop)
    columns = max([len(clips) for _, clips in rows] + [1])
    tile_h, tile_w, pad = 48 * scale, frames * scale, 3
    labels = [label for label, _ in rows]
    label_w = 0 if not any(labels) else 8 + 7 * max(len(s) for s in labels)
    top = 16 if title else 0
    size = (label_w + columns * (tile_w + pad) + pad, top + len(rows) * (tile_h + pad) + pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for r, (label, clips) in enumerate(rows):
        y = top + pad + r * (tile_h + pad)
        for c, clip in enumerate(clips):
            tile = Image.fromarray(display_spectrogram(clip, sample_rate, frames)).resize(
                (tile_w, tile_h), Image.NEAREST
            )
            canvas.paste(tile, (label_w + pad + c * (tile_w + pad), y))
        if label:
            draw.text((4, y + tile_h // 2 - 5), label, fill="black")
    return canvas


def save_spectrogram_grid(
    samples: AudioSamples,
    columns: int,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write the clips of `samples` in rows of `columns` (row r labelled `labels[r]`) as a PNG."""
    from diffalign.core.io import atomic_write

    clips = samples.clips()
    rows = [
        (labels[r] if r < len(labels) else "", clips[r * columns : (r + 1) * columns])
        for r in range(-(-len(clips) // columns))
    ]
    image = spectrogram_grid(rows, samples.sample_rate, title)
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


class SpectrogramGridWriter:
    """Collects decoded clips batch by batch and rewrites one spectrogram grid after every batch: one row
    per prompt (in order of first appearance), one tile per sample of that prompt (its seeds, in order),
    at most `max_columns` per row (more wrap onto unlabelled rows). A call with `start_index` 0, another
    folder, or a `start_index` that does not continue the collected rows starts a new grid."""

    def __init__(self, filename: str = SPECTROGRAMS, max_columns: int = 16) -> None:
        self.filename, self.max_columns = filename, max_columns
        self.folder: Path | None = None
        self.rows: dict[str, list[Tensor]] = {}
        self.count = 0
        self.sample_rate = 0

    def __call__(
        self,
        samples: AudioSamples,
        folder: str | os.PathLike[str],
        prompts: Sequence[Any],
        start_index: int = 0,
    ) -> Path:
        if not isinstance(samples, AudioSamples) or len(samples) != len(prompts):
            raise ValueError(f"expected AudioSamples with one prompt per clip, got {type(samples).__name__}")
        folder = Path(folder)
        if start_index == 0 or folder != self.folder or start_index != self.count:
            self.folder, self.rows, self.count = folder, {}, 0
        self.sample_rate = samples.sample_rate
        for prompt, clip in zip(prompts, samples.clips(), strict=True):
            self.rows.setdefault(str(prompt), []).append(clip.detach().cpu())
        self.count = start_index + len(prompts)
        rows: list[tuple[str, Sequence[Tensor]]] = []
        for prompt, clips in self.rows.items():
            for k in range(0, len(clips), self.max_columns):
                rows.append((prompt if k == 0 else "", clips[k : k + self.max_columns]))
        title = f"{folder.name}: {self.count} clips at {self.sample_rate} Hz, one row per prompt"
        from diffalign.core.io import atomic_write

        image = spectrogram_grid(rows, self.sample_rate, title)
        return atomic_write(folder / self.filename, lambda p: image.save(p, format="PNG"))


class AudioOutputs:
    """Mixin of every audio backbone: what `diffalign sample` writes for a batch of decoded clips."""

    def save_samples(
        self,
        samples: AudioSamples,
        folder: str | os.PathLike[str],
        prompts: Sequence[Any],
        start_index: int = 0,
    ) -> Path:
        """`folder/wav/<index>.wav` per sample (16-bit PCM at the samples' rate, cut to its length) and
        `folder/spectrograms.png`, log-mel spectrograms with one row per prompt (rewritten after every
        batch with all samples so far)."""
        write_wavs(samples, Path(folder) / "wav", start_index)
        if getattr(self, "_grid_writer", None) is None:
            self._grid_writer = SpectrogramGridWriter()
        return self._grid_writer(samples, folder, prompts, start_index)
