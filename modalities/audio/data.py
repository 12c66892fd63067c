"""The embedded audio dataset: synthesized notes and melodies with their (partly noisy) prompts.

`make_clips(num_clips, seed)` draws, per clip, a number of notes (1–3, `note_count_weights`), the notes
(uniform over `prompts.NOTES`), a timbre and a loudness level (uniform), and synthesizes it
(`synth.synthesize`, each clip from its own seeded generator, so clip i is the same whatever else is
drawn). With `caption_noise` p, each note name, the timbre and the level of a clip's caption is,
independently with probability p, replaced by a uniformly random value (possibly the same): captions are
often wrong, and a model trained on such pairs follows its prompt only in part — the room alignment has.

`AudioDataModule` serves `{"sample": [clip (1, L_i), ...], "prompt": ["a C4 square note, quiet", ...]}`
batches (clips of different lengths stay a list; the backbone's `encode` pads them) in a per-epoch
seeded order, and a fixed evaluation set of prompts × seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin
from diffalign.modalities.audio.prompts import LOUDNESS, NOTES, TIMBRES, AudioPrompt, audio_prompt
from diffalign.modalities.audio.synth import NOTE_SAMPLES, SAMPLE_RATE, synthesize


def note_prompts(timbres: Sequence[str] = TIMBRES, loudness: str | None = "medium") -> list[str]:
    """One single-note prompt per (note, timbre): the default evaluation prompts (8 × 4 = 32)."""
    return [audio_prompt(n, t, loudness) for t in timbres for n in NOTES]


def draw_prompt(generator: torch.Generator, note_count_weights: Sequence[float]) -> AudioPrompt:
    """A random prompt: the note count from `note_count_weights`, then notes, timbre and level."""
    k = (
        int(
            torch.multinomial(
                torch.tensor(list(note_count_weights), dtype=torch.float), 1, generator=generator
            )
        )
        + 1
    )
    notes = tuple(NOTES[int(i)] for i in torch.randint(0, len(NOTES), (k,), generator=generator))
    timbre = TIMBRES[int(torch.randint(0, len(TIMBRES), (), generator=generator))]
    level = LOUDNESS[int(torch.randint(0, len(LOUDNESS), (), generator=generator))]
    return AudioPrompt(notes, timbre, level)


def noisy_caption(prompt: AudioPrompt, fraction: float, generator: torch.Generator) -> AudioPrompt:
    """`prompt` with each note, the timbre and the level replaced at random with probability `fraction`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {fraction}")
    swap = torch.rand(len(prompt.notes) + 2, generator=generator) < fraction
    random_notes = torch.randint(0, len(NOTES), (len(prompt.notes),), generator=generator)
    random_timbre = int(torch.randint(0, len(TIMBRES), (), generator=generator))
    random_level = int(torch.randint(0, len(LOUDNESS), (), generator=generator))
    notes = tuple(
        NOTES[int(r)] if s else n for n, r, s in zip(prompt.notes, random_notes, swap, strict=False)
    )
    timbre = TIMBRES[random_timbre] if swap[-2] else prompt.timbre
    level = LOUDNESS[random_level] if swap[-1] else prompt.loudness
    return AudioPrompt(notes, timbre, level)


@lru_cache(maxsize=4)
def make_clips(
    num_clips: int,
    seed: int = 0,
    note_count_weights: tuple[float, ...] = (0.6, 0.25, 0.15),
    sample_rate: int = SAMPLE_RATE,
    note_samples: int = NOTE_SAMPLES,
) -> tuple[tuple[Tensor, ...], tuple[AudioPrompt, ...]]:
    """`num_clips` synthesized clips (1, k·note_samples) and the true prompts they were made from."""
    clips, prompts = [], []
    for i in range(num_clips):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        p = draw_prompt(g, note_count_weights)
        clips.append(synthesize(p, sample_rate, note_samples, g))
        prompts.append(p)
    return tuple(clips), tuple(prompts)


class ClipDataset(Dataset):
    """(clip (1, L), caption text) pairs."""

    def __init__(self, clips: Sequence[Tensor], captions: Sequence[str]) -> None:
        self.clips, self.captions = list(clips), list(captions)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        return self.clips[i], self.captions[i]


def collate_clips(rows: list[tuple[Tensor, str]]) -> dict[str, list]:
    return {"sample": [clip for clip, _ in rows], "prompt": [caption for _, caption in rows]}


class AudioDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Synthesized notes and melodies for pretraining the audio models.

    Args:
        num_clips: clips synthesized (once, cached per process).
        note_count_weights: probabilities of 1, 2, 3 notes per clip (their count sets the most notes).
        caption_noise: probability that each note name, the timbre and the level of a caption is
            replaced by a random one (0: every caption true).
        batch_size, batches_per_epoch: clips per batch; batches per epoch (a per-epoch seeded
            permutation of the clips).
        seed: the clips' seed (and the caption-noise and order seed).
        sample_rate, note_samples: the clips' rate and note length.
        eval_prompts: prompts of the evaluation set (default: `note_prompts()`, 8 notes × 4 timbres).
        eval_seeds_per_prompt, eval_seed: the fixed evaluation set.
    """

    def __init__(
        self,
        num_clips: int = 4096,
        note_count_weights: Sequence[float] = (0.6, 0.25, 0.15),
        caption_noise: float = 0.0,
        batch_size: int = 32,
        batches_per_epoch: int = 32,
        seed: int = 0,
        sample_rate: int = SAMPLE_RATE,
        note_samples: int = NOTE_SAMPLES,
        eval_prompts: list[str] | None = None,
        eval_seeds_per_prompt: int = 4,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        weights = tuple(float(w) for w in note_count_weights)
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"note_count_weights must be non-negative and not all 0, got {list(weights)}")
        clips, prompts = make_clips(num_clips, seed, weights, sample_rate, note_samples)
        g = torch.Generator().manual_seed(seed + 7)
        self.prompts = list(prompts)
        self.captions = [noisy_caption(p, caption_noise, g).text() for p in prompts]
        self.dataset = ClipDataset(clips, self.captions)
        self.caption_noise, self.batch_size, self.batches_per_epoch, self.seed = (
            caption_noise, batch_size, batches_per_epoch, seed,
        )  # fmt: skip
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else note_prompts()
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.dataset), self.batch_size * self.batches_per_epoch, self.seed, replacement=False
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_clips)
