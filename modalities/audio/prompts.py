"""Audio prompts: notes, timbres and loudness levels, as text or as metadata, and their token ids.

A prompt names one to three notes (a note, or a two- or three-note melody), optionally a timbre and a
loudness level, as text or as a dict:

- text: "a C4 square note, quiet", "a C4 E4 G4 sawtooth melody, loud" (case-insensitive; any order);
- dict: `{"notes": ["C4", "E4"], "timbre": "square", "loudness": "quiet"}` (or `"note": "C4"`).

`parse_prompt` turns either into an `AudioPrompt`; rewards read the prompted pitch, timbre and loudness
from `cond["prompt"]` with it. `tokenize` turns prompts into fixed slots of token ids,
`[timbre, loudness, note_1, …, note_k]` (0 = not given, which is also the null condition of
classifier-free guidance), the input of `NoteConditioner`.

Pitch names follow scientific pitch notation with A4 = 440 Hz in twelve-tone equal temperament; the
embedded models know the natural notes C4 … C5 (`NOTES`); other names parse (rewards score them) but
map to the unknown-note token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

#: the notes the embedded models are trained on (C major, one octave)
NOTES: tuple[str, ...] = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5")
#: the synthesized timbres (band-limited sine/square/sawtooth, Karplus–Strong plucked string)
TIMBRES: tuple[str, ...] = ("sine", "square", "sawtooth", "plucked")
#: loudness levels and their integrated loudness targets in LUFS (ITU-R BS.1770)
LOUDNESS_LUFS: dict[str, float] = {"quiet": -34.0, "medium": -26.0, "loud": -18.0}
LOUDNESS: tuple[str, ...] = tuple(LOUDNESS_LUFS)
#: words that name a timbre or a level (synonyms map to the canonical name)
TIMBRE_WORDS = {"sine": "sine", "square": "square", "sawtooth": "sawtooth", "saw": "sawtooth",
                "plucked": "plucked", "pluck": "plucked", "string": "plucked"}  # fmt: skip
LOUDNESS_WORDS = {"quiet": "quiet", "soft": "quiet", "medium": "medium", "moderate": "medium",
                  "loud": "loud"}  # fmt: skip
MAX_NOTES = 3
_SEMITONES = {"c": -9, "d": -7, "e": -5, "f": -4, "g": -2, "a": 0, "b": 2}
_NOTE = re.compile(r"^([a-g])([#b]?)([0-9])$")
_WORD = re.compile(r"[a-z]+#?[0-9]?")


def note_frequency(name: str) -> float:
    """Frequency in Hz of a note name such as "A4" (440), "C4" (261.63) or "F#3" (equal temperament)."""
    m = _NOTE.match(str(name).strip().lower())
    if m is None:
        raise ValueError(f"not a note name: {name!r} (expected a letter A-G, optional # or b, an octave)")
    letter, accidental, octave = m.groups()
    semis = _SEMITONES[letter] + {"#": 1, "b": -1, "": 0}[accidental] + 12 * (int(octave) - 4)
    return 440.0 * 2.0 ** (semis / 12)


def is_note(word: str) -> bool:
    return _NOTE.match(word.lower()) is not None


def canonical_note(name: Any) -> str:
    """ "c#4" → "C#4", "bb3" → "Bb3" (raises ValueError for anything that is not a note name)."""
    m = _NOTE.match(str(name).strip().lower())
    if m is None:
        raise ValueError(f"not a note name: {name!r} (expected a letter A-G, optional # or b, an octave)")
    letter, accidental, octave = m.groups()
    return f"{letter.upper()}{accidental}{octave}"


def cents(f: Tensor | float, ref: Tensor | float) -> Tensor:
    """1200·log2(f / ref): the interval from `ref` to `f` in cents."""
    f = torch.as_tensor(f, dtype=torch.float32)
    ref = torch.as_tensor(ref, dtype=torch.float32)
    return 1200.0 * torch.log2(f / ref)


@dataclass(frozen=True)
class AudioPrompt:
    """What a prompt asks for: notes in order, and the timbre and loudness level if given."""

    notes: tuple[str, ...]
    timbre: str | None = None
    loudness: str | None = None

    @property
    def frequencies(self) -> list[float]:
        return [note_frequency(n) for n in self.notes]

    @property
    def lufs(self) -> float | None:
        """The loudness target in LUFS, or None when the prompt names no level."""
        return None if self.loudness is None else LOUDNESS_LUFS[self.loudness]

    def text(self) -> str:
        """The canonical text form ("a C4 E4 square melody, quiet")."""
        return audio_prompt(self.notes, self.timbre, self.loudness)


def audio_prompt(notes: str | Sequence[str], timbre: str | None = None, loudness: str | None = None) -> str:
    """The canonical prompt text: "a C4 square note, quiet" or "a C4 E4 G4 sine melody, loud"."""
    notes = [notes] if isinstance(notes, str) else list(notes)
    kind = "note" if len(notes) == 1 else "melody"
    middle = " ".join([*notes, *([timbre] if timbre else []), kind])
    return f"a {middle}" + (f", {loudness}" if loudness else "")


def parse_prompt(prompt: Any) -> AudioPrompt:
    """An `AudioPrompt` from prompt text or a dict (see the module docstring); a clear ValueError names
    the prompt when it names no note, more than `MAX_NOTES` notes, or two timbres or levels."""
    if isinstance(prompt, AudioPrompt):
        return prompt
    if isinstance(prompt, Mapping):
        notes = prompt.get("notes", prompt.get("note"))
        notes = [notes] if isinstance(notes, str) else list(notes or [])
        timbre, loudness = prompt.get("timbre"), prompt.get("loudness")
        if timbre is not None and str(timbre).lower() not in TIMBRE_WORDS:
            raise ValueError(f"prompt {dict(prompt)}: unknown timbre {timbre!r} (one of {list(TIMBRES)})")
        if loudness is not None and str(loudness).lower() not in LOUDNESS_WORDS:
            raise ValueError(
                f"prompt {dict(prompt)}: unknown loudness {loudness!r} (one of {list(LOUDNESS)})"
            )
        timbre = None if timbre is None else TIMBRE_WORDS[str(timbre).lower()]
        loudness = None if loudness is None else LOUDNESS_WORDS[str(loudness).lower()]
    else:
        notes, timbres, levels = [], set(), set()
        for w in _WORD.findall(str(prompt).lower()):
            if is_note(w):
                notes.append(w)
            elif w in TIMBRE_WORDS:
                timbres.add(TIMBRE_WORDS[w])
            elif w in LOUDNESS_WORDS:
                levels.add(LOUDNESS_WORDS[w])
        if len(timbres) > 1 or len(levels) > 1:
            raise ValueError(f"prompt {prompt!r} names more than one timbre or loudness level")
        timbre = next(iter(timbres), None)
        loudness = next(iter(levels), None)
    notes = [canonical_note(n) for n in notes]
    if not 1 <= len(notes) <= MAX_NOTES:
        raise ValueError(
            f"prompt {prompt!r} names {len(notes)} notes; an audio prompt names 1 to {MAX_NOTES}"
        )
    return AudioPrompt(tuple(notes), timbre, loudness)


# ---------------------------------------------------------------------------------------------------
# Token slots
# ---------------------------------------------------------------------------------------------------
NULL, UNKNOWN = 0, 1
NOTE_IDS = {n: i + 2 for i, n in enumerate(NOTES)}
TIMBRE_IDS = {t: i + 1 for i, t in enumerate(TIMBRES)}
LOUDNESS_IDS = {name: i + 1 for i, name in enumerate(LOUDNESS)}
NUM_NOTE_TOKENS = len(NOTES) + 2


def tokenize(prompts: Sequence[Any], max_notes: int = MAX_NOTES) -> Tensor:
    """Token slots (B, 2 + max_notes) long: [timbre, loudness, note_1 … note_max_notes].

    Timbre ids 1..4 and loudness ids 1..3 (0: not given); note ids 2.. for `NOTES`, 1 for another note,
    0 for an empty slot. Raises naming the prompt when it has more notes than `max_notes`.
    """
    out = torch.zeros((len(prompts), 2 + max_notes), dtype=torch.long)
    for i, p in enumerate(prompts):
        ap = parse_prompt(p)
        if len(ap.notes) > max_notes:
            raise ValueError(
                f"prompt {p!r} names {len(ap.notes)} notes; this model plays at most {max_notes}"
            )
        out[i, 0] = TIMBRE_IDS.get(ap.timbre, NULL) if ap.timbre else NULL
        out[i, 1] = LOUDNESS_IDS.get(ap.loudness, NULL) if ap.loudness else NULL
        for j, n in enumerate(ap.notes):
            out[i, 2 + j] = NOTE_IDS.get(n, UNKNOWN)
    return out


def num_notes(tokens: Tensor) -> Tensor:
    """(B,) number of non-empty note slots of token slots (B, 2 + k)."""
    return (tokens[:, 2:] != NULL).sum(-1)


class NoteConditioner(nn.Module):
    """Learned embeddings of the token slots: one table for timbres, one for levels, one for notes,
    plus a learned embedding per slot position (so a note knows its place in a melody).

    `forward(tokens)` gives (B, S, D) hidden states (S = 2 + max_notes): what a cross-attention UNet
    reads; `note_embedding(tokens)` gives (B, max_notes, D) note embeddings for time-aligned
    conditioning (the note that sounds at each time), `global_embedding(tokens)` (B, D) the timbre and
    level.

    Args:
        embed_dim: D.
        max_notes: note slots.
    """

    def __init__(self, embed_dim: int = 32, max_notes: int = MAX_NOTES) -> None:
        super().__init__()
        if not 1 <= max_notes <= MAX_NOTES:
            raise ValueError(f"max_notes must be in [1, {MAX_NOTES}], got {max_notes}")
        self.embed_dim, self.max_notes = embed_dim, max_notes
        self.timbre = nn.Embedding(len(TIMBRES) + 1, embed_dim)
        self.loudness = nn.Embedding(len(LOUDNESS) + 1, embed_dim)
        self.note = nn.Embedding(NUM_NOTE_TOKENS, embed_dim)
        # room for MAX_NOTES slots whatever max_notes is, so weights load into models of fewer notes
        self.position = nn.Parameter(torch.zeros(2 + MAX_NOTES, embed_dim))
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.SiLU())
        nn.init.normal_(self.position, std=0.02)

    def _check(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != 2 + self.max_notes:
            raise ValueError(
                f"expected token slots (B, {2 + self.max_notes}) from tokenize(), got {tuple(tokens.shape)}"
            )

    def forward(self, tokens: Tensor) -> Tensor:
        self._check(tokens)
        h = torch.cat(
            [self.timbre(tokens[:, :1]), self.loudness(tokens[:, 1:2]), self.note(tokens[:, 2:])], dim=1
        )
        h = h + self.position[: h.shape[1]]
        return h + self.mlp(h)

    def note_embedding(self, tokens: Tensor) -> Tensor:
        self._check(tokens)
        return self.note(tokens[:, 2:]) + self.position[2 : 2 + self.max_notes]

    def global_embedding(self, tokens: Tensor) -> Tensor:
        self._check(tokens)
        return self.timbre(tokens[:, 0]) + self.loudness(tokens[:, 1])
