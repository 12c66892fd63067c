"""Audio rewards pinned on signals whose answer is known: pure tones of known pitch and level, white noise,
a clipped sine, silence."""

import math

import pytest
import torch

from diffalign.core.types import Cond
from diffalign.modalities.audio import AudioSamples, note_frequency, synthesize
from diffalign.modalities.audio.loudness import SILENCE_LUFS, integrated_lufs, rms_db
from diffalign.rewards.audio import (
    ClippingRatio,
    LoudnessLUFS,
    NoiseFloor,
    PitchAccuracy,
    RMSLoudness,
    SpectralFlatness,
    TimbreFidelity,
)
from diffalign.rewards.audio_pitch import yin

SR = 8000


def tone(freq, seconds=0.256, sr=SR, amplitude=0.5, harmonics=(1.0,)):
    t = torch.arange(int(seconds * sr)) / sr
    x = sum(a * torch.sin(2 * math.pi * (k + 1) * freq * t) for k, a in enumerate(harmonics))
    return amplitude * x / x.abs().max()


def samples(*clips, sr=SR):
    n = max(c.shape[-1] for c in clips)
    audio = torch.stack([torch.nn.functional.pad(c, (0, n - c.shape[-1])) for c in clips])[:, None]
    return AudioSamples(audio, sr, [c.shape[-1] for c in clips])


def cond(*prompts):
    return Cond({"prompt": list(prompts)})


# -- pitch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freq", [110.0, 220.0, 261.63, 440.0, 523.25, 1000.0])
def test_yin_finds_the_pitch_of_pure_tones(freq):
    track = yin(tone(freq)[None], SR)
    f0 = track.f0[0][track.voiced[0]].median().item()
    assert abs(1200 * math.log2(f0 / freq)) < 3  # cents


@pytest.mark.parametrize(
    "name,harmonics",
    [
        ("sawtooth: strong 2nd harmonic", [1 / k for k in range(1, 10)]),
        ("weak fundamental", [0.1, 1.0, 0.8]),
        ("2nd harmonic 3x the fundamental", [0.3, 1.0]),
        ("square: odd harmonics", [1.0, 0.0, 1 / 3, 0.0, 1 / 5]),
    ],
)
@pytest.mark.parametrize("freq", [220.0, 300.0])
def test_yin_makes_no_octave_errors(name, harmonics, freq):
    """torchaudio's detect_pitch_frequency reads 219 Hz for both 220 and 440 Hz; YIN's first dip of the
    normalised difference must give the fundamental, not half or double it."""
    track = yin(tone(freq, harmonics=harmonics)[None], SR)
    f0 = track.f0[0][track.voiced[0]].median().item()
    assert abs(1200 * math.log2(f0 / freq)) < 10, f"{name}: {f0:.1f} Hz for {freq} Hz"


def test_yin_silence_and_noise_are_unvoiced():
    g = torch.Generator().manual_seed(0)
    quiet = yin(torch.zeros(1, 2048), SR)
    noise = yin(torch.randn(1, 2048, generator=g) * 0.1, SR)
    assert not quiet.voiced.any() and noise.voiced.float().mean() < 0.1


def test_pitch_accuracy_scores_the_prompted_note():
    reward = PitchAccuracy()
    a4 = tone(440.0)
    out = reward(samples(a4, a4, a4), cond("a A4 sine note", "a A#4 sine note", "a A5 sine note"))
    right, semitone, octave = out.scores.tolist()
    assert right > 0.99
    assert semitone == pytest.approx(math.exp(-0.5 * (100 / 50) ** 2), abs=0.02)  # 100 cents, σ = 50
    assert octave < 1e-6  # 1200 cents: an octave error scores nothing
    assert out.info["note_accuracy"].tolist() == [1.0, 0.0, 0.0]


def test_pitch_accuracy_scores_each_note_of_a_melody_and_silence_as_zero():
    melody = torch.cat([tone(note_frequency(n)) for n in ("C4", "E4", "G4")])
    half_right = torch.cat([tone(note_frequency("C4")), tone(note_frequency("F4"))])
    silent = torch.zeros(4096)
    out = PitchAccuracy()(
        samples(melody, half_right, silent), cond("a C4 E4 G4 melody", "a C4 E4 melody", "a C4 E4 melody")
    )
    full, half, none = out.scores.tolist()
    assert full > 0.98
    assert half == pytest.approx(
        0.5 * (1 + math.exp(-0.5 * (100 / 50) ** 2)), abs=0.03
    )  # F4 is a semitone off
    assert none == 0.0 and out.info["voiced"][2] == 0.0


def test_pitch_accuracy_on_synthesized_notes_of_every_timbre():
    g = torch.Generator().manual_seed(0)
    prompts = [
        f"a {n} {t} note, loud" for t in ("sine", "square", "sawtooth", "plucked") for n in ("C4", "A4")
    ]
    clips = [synthesize(p, generator=g)[0] for p in prompts]
    assert PitchAccuracy()(samples(*clips), cond(*prompts)).scores.min() > 0.95


def test_pitch_accuracy_needs_prompts():
    with pytest.raises(KeyError, match="cond\\['prompt'\\]"):
        PitchAccuracy()(samples(tone(440.0)), Cond.empty(1))


def test_crepe_tracker_is_optional():
    pytest.importorskip("torchcrepe")  # only where torchcrepe is installed
    out = PitchAccuracy(tracker="crepe")(samples(tone(440.0, seconds=0.5)), cond("a A4 note"))
    assert out.scores[0] > 0.9


# -- loudness -------------------------------------------------------------------------------------
def test_lufs_of_a_1khz_sine_equals_its_rms_level():
    """BS.1770 is calibrated so that a 1 kHz tone reads its RMS level (amplitude A: 20·log10(A/√2))."""
    for amplitude in (0.5, 0.1, 0.02):
        x = tone(1000.0, seconds=1.0, sr=48000, amplitude=amplitude)
        lufs = integrated_lufs(x[None, None], 48000)[0].item()
        assert lufs == pytest.approx(20 * math.log10(amplitude / math.sqrt(2)), abs=0.1)


def test_lufs_follows_gain_and_reads_silence_at_the_floor():
    x = tone(440.0)
    levels = integrated_lufs(torch.stack([x, 0.5 * x, torch.zeros_like(x)])[:, None], SR).tolist()
    assert levels[0] - levels[1] == pytest.approx(20 * math.log10(2), abs=0.05)
    assert levels[2] == SILENCE_LUFS


def test_rms_db_is_exact_and_differentiable():
    x = tone(440.0, amplitude=0.5).requires_grad_(True)
    level = rms_db(x[None, None])
    assert level.item() == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    level.sum().backward()
    assert x.grad.abs().sum() > 0
    # only the real samples count
    padded = torch.cat([x.detach(), torch.zeros(1000)])
    assert rms_db(padded[None, None], torch.tensor([x.shape[0]])).item() == pytest.approx(
        level.item(), abs=1e-4
    )


def test_loudness_rewards_score_the_prompted_level():
    quiet = tone(1000.0, amplitude=10 ** (-34 / 20) * math.sqrt(2))  # −34 dB RMS ≈ −34 LUFS at 1 kHz
    s = samples(quiet, quiet)
    c = cond("a C4 note, quiet", "a C4 note, loud")  # targets −34 and −18 LUFS
    lufs = LoudnessLUFS()(s, c)
    assert lufs.scores[0].item() > -0.5
    assert lufs.scores[1].item() == pytest.approx(-16.0, abs=0.5)
    rms = RMSLoudness()(s, c)
    assert rms.scores[0].item() == pytest.approx(0.0, abs=0.01)
    assert rms.scores[1].item() == pytest.approx(1 - math.sqrt(16**2 + 1), abs=0.01)
    assert LoudnessLUFS(target_lufs=-34.0)(s, Cond.empty(2)).scores.min() > -0.5


def test_loudness_needs_a_level_in_the_prompt_or_a_target():
    with pytest.raises(ValueError, match="names no loudness level"):
        LoudnessLUFS()(samples(tone(440.0)), cond("a C4 note"))


# -- spectrum, clipping, noise ----------------------------------------------------------------------
def test_spectral_flatness_of_a_tone_and_of_white_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8000, generator=g) * 0.1
    out = SpectralFlatness()(samples(tone(440.0, seconds=1.0), noise), Cond.empty(2))
    tonal, white = out.info["flatness"].tolist()
    assert tonal < 0.01
    assert white == pytest.approx(math.exp(-0.5772156649), abs=0.03)  # periodogram bins are exponential
    assert out.scores.tolist() == pytest.approx([-tonal, -white])
    assert SpectralFlatness(prefer="noisy")(samples(noise), Cond.empty(1)).scores[0] > 0.5


def test_spectral_flatness_is_differentiable():
    x = (tone(440.0) + 0.01 * torch.randn(2048)).requires_grad_(True)
    SpectralFlatness()(samples(x), Cond.empty(1)).scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_clipping_ratio_of_a_clipped_sine():
    clipped = tone(440.0, seconds=1.0, amplitude=2.0).clamp(-1, 1)  # |2 sin| >= 0.99 on 1 − (2/π)·asin(0.495)
    out = ClippingRatio()(samples(clipped, tone(440.0, seconds=1.0)), Cond.empty(2))
    assert out.info["clipped"][0].item() == pytest.approx(1 - 2 / math.pi * math.asin(0.495), abs=0.01)
    assert out.scores[1].item() == 0.0


def test_noise_floor_reads_white_noise_under_a_tone():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8000, generator=g) * 0.01
    out = NoiseFloor()(
        samples(noise, tone(440.0, seconds=1.0) + noise, tone(440.0, seconds=1.0)), Cond.empty(3)
    )
    floor = out.info["noise_floor_db"].tolist()
    expected = 10 * math.log10(0.01**2 * math.log(2))  # the median of exponential bins of mean σ²
    assert floor[0] == pytest.approx(expected, abs=1.0)
    assert floor[1] == pytest.approx(expected, abs=1.5)  # the tone occupies few bins
    assert floor[2] < expected - 20  # a clean tone has almost no floor


# -- timbre -------------------------------------------------------------------------------------------
def test_timbre_fidelity_recognises_synthesized_timbres():
    g = torch.Generator().manual_seed(3)
    prompts = [
        f"a {n} {t} note, {lv}"
        for t in ("sine", "square", "sawtooth", "plucked")
        for n, lv in (("D4", "quiet"), ("A4", "loud"))
    ]
    clips = [synthesize(p, generator=g)[0] for p in prompts]
    reward = TimbreFidelity()
    out = reward(samples(*clips), cond(*prompts))
    assert out.info["timbre_accuracy"].mean() == 1.0 and out.scores.min() > 0.5
    wrong = [p.replace("sine", "square") if "sine" in p else p.replace(p.split()[2], "sine") for p in prompts]
    assert reward(samples(*clips), cond(*wrong)).scores.max() < 0.5


def test_timbre_fidelity_is_differentiable():
    x = synthesize("a C4 square note, loud")[0].requires_grad_(True)
    TimbreFidelity()(samples(x), cond("a C4 square note")).scores.sum().backward()
    assert x.grad.abs().sum() > 0


# -- CLAP -------------------------------------------------------------------------------------------
def test_clap_score_is_the_cosine_of_clap_embeddings(tmp_path):
    from diffalign.modalities.audio.testing import make_tiny_clap_folder
    from diffalign.rewards.audio_models import CLAPScore

    make_tiny_clap_folder(tmp_path / "clap")
    reward = CLAPScore(str(tmp_path / "clap"), scale=2.0)
    assert reward.request == {"sample_rate": 48000}  # decode resamples to the feature extractor's rate
    clips = [synthesize(p)[0] for p in ("a C4 sine note", "a G4 square note")]
    s = samples(*clips)
    out = reward(s, cond("a C4 sine note", "a G4 square note"))
    # the same numbers from the model's own feature functions
    from diffalign.modalities.audio import resample

    s48 = resample(s, 48000)
    feats = reward.features(
        [c.mean(0).numpy() for c in s48.clips()], sampling_rate=48000, return_tensors="pt"
    )
    text = reward.tokenizer(["a C4 sine note", "a G4 square note"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = reward.model.get_audio_features(input_features=feats["input_features"]).pooler_output
        t = reward.model.get_text_features(**text).pooler_output
    cosine = torch.nn.functional.cosine_similarity(a, t)
    assert torch.allclose(out.info["clap_cosine"], cosine, atol=1e-5)
    assert torch.allclose(out.scores, 2.0 * cosine, atol=1e-5) and out.scores.abs().max() <= 2.0


def test_clap_needs_a_local_folder(tmp_path):
    from diffalign.rewards.audio_models import CLAPScore

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CLAPScore(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLAPScore(str(tmp_path / "empty"))
