"""Audio files and pictures: WAV/FLAC round trips, a folder reader with an error per unreadable file, the
files `diffalign sample` writes, and the before/after spectrograms and WAVs of a run."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.modalities.audio import AudioSamples, synthesize
from diffalign.modalities.audio.callbacks import SampleSpectrograms
from diffalign.modalities.audio.io import (
    SpectrogramGridWriter,
    read_audio,
    read_audio_folder,
    spectrogram_grid,
    write_wav,
)
from diffalign.modalities.audio.testing import tiny_wave_backbone


def test_wav_round_trip_is_16_bit_exact(tmp_path):
    clip = synthesize("a A4 square note, loud")
    write_wav(tmp_path / "a.wav", clip, 8000)
    back, rate = read_audio(tmp_path / "a.wav")
    assert rate == 8000 and back.shape == clip.shape
    assert (back - clip).abs().max() < 1 / 32767


def test_folder_reader_gives_one_row_per_file_and_errors_for_bad_ones(tmp_path):
    import soundfile

    write_wav(tmp_path / "b.wav", synthesize("a C4 sine note"), 8000)
    (tmp_path / "sub").mkdir()
    soundfile.write(str(tmp_path / "sub" / "c.flac"), np.full((800, 2), 0.25), 16000)
    (tmp_path / "a.wav").write_bytes(b"not a wav file at all")
    (tmp_path / "notes.txt").write_text("ignored")
    rows = dict(read_audio_folder(tmp_path))
    assert list(rows) == ["a.wav", "b.wav", "sub/c.flac"]
    assert isinstance(rows["a.wav"], str) and "Error" in rows["a.wav"]
    b, c = rows["b.wav"], rows["sub/c.flac"]
    assert isinstance(b, AudioSamples) and b.sample_rate == 8000 and b.audio.shape == (1, 1, 2048)
    assert c.sample_rate == 16000 and c.audio.shape == (1, 1, 800)  # stereo is mixed to mono
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_audio_folder(tmp_path / "missing"))


def test_save_samples_writes_a_wav_per_sample_and_one_grid(tmp_path):
    backbone = tiny_wave_backbone()
    clips = torch.stack(
        [torch.cat([synthesize("a C4 sine note", note_samples=256), torch.zeros(1, 256)], -1)] * 3
    )
    samples = AudioSamples(clips, 8000, [256, 512, 256])
    backbone.save_samples(samples[:2], tmp_path, ["a C4 sine note", "a C4 sine note"], start_index=0)
    backbone.save_samples(samples[2:], tmp_path, ["a G4 note"], start_index=2)
    wavs = sorted(p.name for p in (tmp_path / "wav").iterdir())
    assert wavs == ["000000.wav", "000001.wav", "000002.wav"]
    assert read_audio(tmp_path / "wav" / "000001.wav")[0].shape == (1, 512)  # cut to its length
    from PIL import Image

    with Image.open(tmp_path / "spectrograms.png") as im:
        assert im.size[1] > 2 * 96  # two rows (two prompts) of 96-pixel tiles and a title
    assert backbone._grid_writer.count == 3


def test_grid_writer_starts_over_on_a_new_folder(tmp_path):
    writer = SpectrogramGridWriter()
    s = AudioSamples(torch.zeros(1, 1, 800), 8000)
    writer(s, tmp_path / "a", ["x"])
    writer(s, tmp_path / "b", ["y"], start_index=1)
    assert writer.rows.keys() == {"y"} and (tmp_path / "b" / "spectrograms.png").is_file()
    with pytest.raises(ValueError, match="one prompt per clip"):
        writer(s, tmp_path, ["x", "y"])
    assert spectrogram_grid([("silence", [torch.zeros(100)])], 8000).size[0] > 0


def test_sample_spectrograms_writes_before_and_after_with_the_same_seeds(tmp_path):
    from diffalign.core.kernels import FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy

    policy = DiffusionPolicy(tiny_wave_backbone(), FlowSDEKernel(), num_steps=2)
    module = SimpleNamespace(policy=policy)
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), global_step=0, loggers=[])
    cb = SampleSpectrograms(prompts=["a C4 sine note", "a D4 E4 square melody"], seeds_per_prompt=2)
    cb.on_fit_start(trainer, module)
    cb.on_fit_end(trainer, module)
    for tag in ("before", "after"):
        assert (tmp_path / f"spectrograms_{tag}.png").is_file()
        assert sorted(p.name for p in (tmp_path / f"wav_{tag}").iterdir()) == [
            "000_00.wav",
            "000_01.wav",
            "001_00.wav",
            "001_01.wav",
        ]
    # untrained in between: the same (prompt, seed) gives the same clip
    a, _ = read_audio(tmp_path / "wav_before" / "001_01.wav")
    b, _ = read_audio(tmp_path / "wav_after" / "001_01.wav")
    assert torch.equal(a, b) and a.shape == (1, 512)  # the melody has two notes of 256 samples
