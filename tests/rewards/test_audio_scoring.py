"""`diffalign score` on folders of WAV/FLAC files through the audio Reward classes training uses: one row per
file in name order, prompts from prompts.csv or --prompt, an error row per unreadable file, and the same
numbers as the rewards called directly on the clips (read here with soundfile, not with the reader)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile
import torch

from diffalign.core.cli import cli_main
from diffalign.core.score import plan
from diffalign.core.types import Cond
from diffalign.modalities.audio import AudioSamples, synthesize
from diffalign.modalities.audio.io import AudioReader, write_wav
from diffalign.rewards.audio import LoudnessLUFS, PitchAccuracy, SpectralFlatness, TimbreFidelity
from diffalign.rewards.scoring import NAMES, score_file

# (file, what was synthesized, what the prompt asks for): even rows asked right, odd rows asked wrong
NOTES = [
    ("a.wav", "a C4 sine note, quiet", "a C4 sine note, quiet"),
    ("b.wav", "a G4 square note, loud", "a D4 sawtooth note, quiet"),
    ("c.wav", "a E4 G4 plucked melody, medium", "a E4 G4 plucked melody, medium"),
    ("d.wav", "a A4 sawtooth note, medium", "a C5 sine note, loud"),
]


def _clip(path):
    """(clip (1, L) mono float32, rate) read with soundfile here, independently of the reader."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()).mean(0, keepdim=True), rate


def _batch(paths):
    clips = [_clip(p) for p in paths]
    n = max(c.shape[-1] for c, _ in clips)
    audio = torch.stack([torch.nn.functional.pad(c, (0, n - c.shape[-1])) for c, _ in clips])
    return AudioSamples(audio, clips[0][1], [c.shape[-1] for c, _ in clips])


@pytest.fixture(scope="module")
def note_folder(tmp_path_factory):
    """Four synthesized notes and melodies at 8 kHz, a 16 kHz stereo FLAC, a prompts.csv and a text file."""
    folder = tmp_path_factory.mktemp("notes")
    lines = ["file,prompt"]
    for i, (name, made, asked) in enumerate(NOTES):
        write_wav(folder / name, synthesize(made, generator=torch.Generator().manual_seed(i)), 8000)
        lines.append(f'{name},"{asked}"')
    t = np.arange(4096) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    soundfile.write(str(folder / "e.flac"), np.stack([tone, tone], 1), 16000)
    lines.append('e.flac,"a A4 sine note, medium"')
    (folder / "prompts.csv").write_text("\n".join(lines) + "\n")
    (folder / "notes.txt").write_text("not audio, not a record\n")
    return folder


def test_audio_folder_scores_through_the_reward_classes(note_folder, tmp_path):
    out = tmp_path / "s.csv"
    args = ["score", str(note_folder), "-r", "pitch_accuracy,loudness_lufs,timbre_fidelity", "-o", str(out)]
    assert cli_main([*args, "--workers", "2"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "record", "id", "path", "prompt", "pitch_accuracy", "loudness_lufs", "timbre_fidelity", "error",
    ]  # fmt: skip
    assert [r["id"] for r in rows] == ["a.wav", "b.wav", "c.wav", "d.wav", "e.flac"]
    assert all(r["error"] == "" for r in rows)
    assert [r["prompt"] for r in rows[:4]] == [asked for _, _, asked in NOTES]  # from prompts.csv
    pitch = [float(r["pitch_accuracy"]) for r in rows]
    assert min(pitch[0], pitch[2], pitch[4]) > 0.9 and max(pitch[1], pitch[3]) < 0.1
    # the same numbers as the rewards called on each clip: the 16 kHz FLAC cannot share a batch with the
    # 8 kHz WAVs, so the engine scores this chunk one file at a time
    prompts = [asked for _, _, asked in NOTES] + ["a A4 sine note, medium"]
    for column, reward in [
        ("pitch_accuracy", PitchAccuracy()),
        ("loudness_lufs", LoudnessLUFS()),
        ("timbre_fidelity", TimbreFidelity()),
    ]:
        direct = [
            reward(_batch([note_folder / r["id"]]), Cond({"prompt": [p]})).scores.item()
            for r, p in zip(rows, prompts, strict=True)
        ]
        assert [float(r[column]) for r in rows] == pytest.approx(direct, rel=1e-5, abs=1e-6), column


def test_a_folder_at_one_rate_is_scored_as_one_padded_batch(note_folder, tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    for name, _, _ in NOTES:
        (folder / name).write_bytes((note_folder / name).read_bytes())
    prompts = [asked for _, _, asked in NOTES]
    rows = score_file(
        folder, "pitch_accuracy,loudness_lufs", prompts=str(note_folder / "prompts.csv"), workers=1
    )
    wavs, cond = _batch([folder / n for n, _, _ in NOTES]), Cond({"prompt": prompts})
    assert [r["pitch_accuracy"] for r in rows] == pytest.approx(
        PitchAccuracy()(wavs, cond).scores.tolist(), rel=1e-5
    )
    assert [r["loudness_lufs"] for r in rows] == pytest.approx(
        LoudnessLUFS()(wavs, cond).scores.tolist(), rel=1e-5
    )


def test_unreadable_files_are_one_error_row_each(note_folder, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "1_good.wav").write_bytes((note_folder / "a.wav").read_bytes())
    (folder / "2_garbage.wav").write_bytes(b"RIFF not really a wave file")
    soundfile.write(str(folder / "3_empty.wav"), np.zeros((0, 1)), 8000)
    (folder / "4_cut.flac").write_bytes((note_folder / "e.flac").read_bytes()[:40])
    (folder / "5_good.wav").write_bytes((note_folder / "c.wav").read_bytes())
    rows = score_file(folder, "pitch_accuracy,spectral_flatness", prompt="a C4 sine note, quiet", workers=1)
    assert [r["id"] for r in rows] == [
        "1_good.wav",
        "2_garbage.wav",
        "3_empty.wav",
        "4_cut.flac",
        "5_good.wav",
    ]
    assert rows[0]["error"] is None and rows[0]["pitch_accuracy"] > 0.9  # --prompt for every file
    assert rows[4]["error"] is None and rows[4]["pitch_accuracy"] < 0.1  # a melody, not a C4
    for row, why in zip(
        rows[1:4], ["cannot read audio 2_garbage.wav", "no samples", "4_cut.flac"], strict=True
    ):
        assert row["pitch_accuracy"] is None and row["spectral_flatness"] is None
        assert why in row["error"], row["error"]
    # without prompts, prompt-free rewards still score and prompted ones say why per row
    rows = score_file(folder / "1_good.wav", "spectral_flatness,pitch_accuracy", workers=1)
    direct = SpectralFlatness()(_batch([folder / "1_good.wav"]), Cond.empty(1)).scores.item()
    assert rows[0]["spectral_flatness"] == pytest.approx(direct, rel=1e-5)
    assert rows[0]["pitch_accuracy"] is None and "prompt" in rows[0]["error"]


def test_audio_rewards_declare_the_audio_reader_and_its_options(note_folder):
    assert plan(note_folder, "pitch_accuracy", names=NAMES).reader.class_path.endswith("audio.io.AudioReader")
    reader = AudioReader(sample_rate=8000)
    flac = reader.load(str(note_folder / "e.flac"))
    assert flac.sample_rate == 8000 and flac.audio.shape == (1, 1, 2048)  # 16 kHz stereo → 8 kHz mono
    batch = AudioReader().collate([AudioReader().load(str(note_folder / n)) for n in ("a.wav", "c.wav")])
    assert batch.audio.shape == (2, 1, 4096) and batch.lengths.tolist() == [2048, 4096]
    with pytest.raises(ValueError, match="sample rates"):
        AudioReader().collate([AudioReader().load(str(note_folder / n)) for n in ("a.wav", "e.flac")])
    (note_folder / "sub").mkdir(exist_ok=True)
    (note_folder / "sub" / "f.wav").write_bytes((note_folder / "a.wav").read_bytes())
    ids = [r.id for r in AudioReader(recursive=True).records(note_folder)]
    assert ids == ["a.wav", "b.wav", "c.wav", "d.wav", "e.flac", "sub/f.wav"]
    assert "sub/f.wav" not in [r.id for r in AudioReader().records(note_folder)]
    (note_folder / "sub" / "f.wav").unlink()
