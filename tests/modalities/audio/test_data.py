"""Prompts, synthesis and the embedded dataset: known pitches, levels and durations, seeded and noisy
captions."""

import math

import pytest
import torch

from diffalign.modalities.audio import (
    LOUDNESS_LUFS,
    NOTES,
    AudioDataModule,
    audio_prompt,
    note_frequency,
    parse_prompt,
    synthesize,
)
from diffalign.modalities.audio.data import make_clips, noisy_caption, note_prompts
from diffalign.modalities.audio.loudness import integrated_lufs
from diffalign.modalities.audio.prompts import AudioPrompt, tokenize
from diffalign.modalities.audio.synth import karplus_strong
from diffalign.rewards.audio_pitch import yin


def test_note_frequencies_are_equal_tempered_from_a440():
    assert note_frequency("A4") == 440.0
    assert note_frequency("C4") == pytest.approx(261.626, abs=1e-3)
    assert note_frequency("A5") == 880.0 and note_frequency("a#4") == pytest.approx(466.164, abs=1e-3)
    with pytest.raises(ValueError, match="not a note name"):
        note_frequency("H2")


def test_prompts_parse_from_text_and_dicts():
    assert parse_prompt("a C4 square note, quiet") == AudioPrompt(("C4",), "square", "quiet")
    assert parse_prompt("A c4 E4 g4 saw melody LOUD") == AudioPrompt(("C4", "E4", "G4"), "sawtooth", "loud")
    assert parse_prompt({"note": "A4", "timbre": "pluck"}) == AudioPrompt(("A4",), "plucked", None)
    assert audio_prompt(["C4", "E4"], "sine", "medium") == "a C4 E4 sine melody, medium"
    assert parse_prompt(audio_prompt(["C4", "E4"], "sine", "medium")).text() == "a C4 E4 sine melody, medium"
    with pytest.raises(ValueError, match="more than one timbre"):
        parse_prompt("a C4 sine square note")
    with pytest.raises(ValueError, match="unknown timbre"):
        parse_prompt({"note": "C4", "timbre": "violin"})
    tokens = tokenize(["a C4 square note, quiet", "a Bb3 note"], max_notes=3)
    assert tokens.tolist() == [[2, 1, 2, 0, 0], [0, 0, 1, 0, 0]]  # timbre, level, notes (1: an unknown note)


@pytest.mark.parametrize("timbre", ["sine", "square", "sawtooth", "plucked"])
def test_synthesized_notes_have_their_pitch_level_and_length(timbre):
    g = torch.Generator().manual_seed(0)
    for note, level in (("C4", "quiet"), ("A4", "medium"), ("C5", "loud")):
        clip = synthesize(f"a {note} {timbre} note, {level}", generator=g)
        assert clip.shape == (1, 2048) and clip.abs().max() <= 0.95
        track = yin(clip, 8000)
        f0 = track.f0[0][track.voiced[0]].median().item()
        assert abs(1200 * math.log2(f0 / note_frequency(note))) < 10
        lufs = integrated_lufs(clip[None], 8000).item()
        # loud plucked strings hit the peak limit first and end up a little quieter
        assert (
            LOUDNESS_LUFS[level] - (3.0 if timbre == "plucked" else 0.05)
            <= lufs
            <= LOUDNESS_LUFS[level] + 0.05
        )


def test_karplus_strong_is_tuned_and_decays():
    x = karplus_strong(note_frequency("E4"), 8000, 8000, torch.Generator().manual_seed(1))
    f0 = yin(x[None].float(), 8000)
    assert abs(1200 * math.log2(f0.f0[0][f0.voiced[0]].median().item() / note_frequency("E4"))) < 5
    assert x[-800:].abs().max() < 0.5 * x[:800].abs().max()


def test_melodies_concatenate_notes_and_synthesis_is_seeded():
    a = synthesize("a C4 E4 G4 sine melody, loud", generator=torch.Generator().manual_seed(3))
    b = synthesize("a C4 E4 G4 sine melody, loud", generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 3 * 2048) and torch.equal(a, b)


def test_clips_are_seeded_per_clip_and_captions_noisy_at_the_rate():
    clips, prompts = make_clips(64, seed=5)
    again, _ = make_clips(64, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(clips, again, strict=True))
    assert all(c.shape[-1] == 2048 * len(p.notes) for c, p in zip(clips, prompts, strict=True))
    g = torch.Generator().manual_seed(0)
    base = AudioPrompt(("C4", "E4"), "sine", "quiet")
    noisy = [noisy_caption(base, 0.4, g) for _ in range(2000)]
    changed = sum(n.notes[0] != "C4" for n in noisy) / len(noisy)
    assert changed == pytest.approx(0.4 * 7 / 8, abs=0.04)  # a replacement can name the same note
    assert noisy_caption(base, 0.0, g) == base


def test_data_module_batches_ragged_clips_with_captions():
    dm = AudioDataModule(num_clips=48, caption_noise=0.0, batch_size=8, batches_per_epoch=2)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["sample"]) == 8 and len(batch["prompt"]) == 8
    for clip, prompt in zip(batch["sample"], batch["prompt"], strict=True):
        assert clip.shape[-1] == 2048 * len(parse_prompt(prompt).notes)
    assert len(dm.evaluation_set()) == len(note_prompts()) * dm.eval_seeds_per_prompt
    assert len(note_prompts()) == 4 * len(NOTES)
