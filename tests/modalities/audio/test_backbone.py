"""The audio backbones fit the core: the contract check for both, both prediction types, variable durations,
the layout and its decode requests, encode ↔ decode, CFG and LoRA."""

import pytest
import torch

from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import check_backbone
from diffalign.modalities.audio import AudioSamples, MelCodec, synthesize
from diffalign.modalities.audio.backbone import run_by_length
from diffalign.modalities.audio.testing import tiny_mel_backbone, tiny_wave_backbone

BATCH = {
    "prompt": ["a C4 sine note, quiet", "a D4 E4 square melody, loud", {"notes": ["G4"], "timbre": "plucked"}]
}
BACKBONES = {"mel": tiny_mel_backbone, "wave": tiny_wave_backbone}


def kernel(backbone):
    return FlowSDEKernel() if backbone.prediction_type == "flow" else DDIMKernel(eta=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_check_backbone(kind, prediction_type):
    backbone = BACKBONES[kind](prediction_type=prediction_type)
    check_backbone(backbone, BATCH, kernel(backbone))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_durations_follow_the_prompt_and_padding_stays_zero(kind):
    backbone = BACKBONES[kind]()
    cond = backbone.condition(BATCH)
    assert cond["num_notes"].tolist() == [1, 2, 1] and cond.prompts == BATCH["prompt"]
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    assert mask.shape[-1] == x.shape[-1] and mask.dim() == x.dim()
    assert mask[0].sum() * 2 == mask[1].sum()  # two notes last twice as long as one
    assert (x * (1 - mask)).abs().max() == 0
    policy = DiffusionPolicy(backbone, kernel(backbone), num_steps=2)
    traj = policy.rollout(cond, torch.Generator().manual_seed(1))
    samples = backbone.decode(traj.x0, traj.mask)
    assert isinstance(samples, AudioSamples) and samples.sample_rate == backbone.sample_rate
    n = backbone.note_samples
    assert samples.lengths.tolist() == [n, 2 * n, n] and samples.audio.shape == (3, 1, 2 * n)
    assert samples.audio[0, :, n:].abs().max() == 0 and samples.audio.abs().max() <= 1
    assert samples[1].shape == (1, 2 * n) and samples[0].shape == (1, n)  # an int gives one clip


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_a_clip_does_not_depend_on_its_batch(kind):
    """The denoiser runs once per clip length, so a short clip next to a long one gets the same output as
    alone (no padding leaks into it)."""
    backbone = BACKBONES[kind]()
    cond = backbone.condition(BATCH)
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((3,), 500)
    together = backbone.denoise(x, t, cond, mask)
    alone = backbone.denoise(x[:1], t[:1], cond[[0]], mask[:1])
    assert torch.allclose(together[:1], alone, atol=1e-5)


def test_run_by_length_pads_and_groups():
    x = torch.arange(12.0).reshape(3, 1, 4)
    calls = []

    def fn(part, rows):
        calls.append((part.shape[-1], rows.tolist()))
        return part * 10

    out = run_by_length(fn, x, torch.tensor([2, 4, 1]), multiple=2)
    assert sorted(calls) == [(2, [0, 2]), (4, [1])]
    assert out[0, 0].tolist() == [0, 10, 0, 0] and out[1, 0].tolist() == [40, 50, 60, 70]


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_encode_takes_layouts_tensors_and_ragged_lists(kind):
    backbone = BACKBONES[kind]()
    n = backbone.note_samples
    clips = [torch.rand(1, n) * 0.2 - 0.1, torch.rand(1, 2 * n) * 0.2 - 0.1]
    x_list, m_list = backbone.encode(clips)
    x_layout, m_layout = backbone.encode(
        AudioSamples(torch.stack([torch.cat([clips[0], torch.zeros(1, n)], -1), clips[1]]), 8000, [n, 2 * n])
    )
    assert torch.allclose(x_list, x_layout) and torch.equal(m_list, m_layout)
    assert (x_list * (1 - m_list)).abs().max() == 0  # padding is exactly zero
    x_full, m_full = backbone.encode(torch.stack([clips[1], clips[1]]))
    assert m_full.min() == 1
    with pytest.raises(ValueError, match="at most"):
        backbone.encode([torch.zeros(1, 3 * n)])
    with pytest.raises(TypeError, match="AudioSamples"):
        backbone.encode("clip.wav")
    # another sample rate is resampled first
    x16, _ = backbone.encode(AudioSamples(torch.zeros(1, 1, 4 * n), 16000))
    assert x16.shape[1:] == x_list.shape[1:]


def test_waveform_encode_decode_round_trip_is_exact():
    backbone = tiny_wave_backbone()
    clip = synthesize("a C4 square note, loud", note_samples=256)
    x, mask = backbone.encode([clip])
    out = backbone.decode(x, mask)
    assert torch.allclose(out.clip(0), clip, atol=1e-6)


def test_mel_codec_round_trip_keeps_pitch_and_level():
    from diffalign.core.types import Cond
    from diffalign.modalities.audio.loudness import integrated_lufs
    from diffalign.rewards.audio import PitchAccuracy

    codec = MelCodec()
    prompts = [
        "a C4 sine note, quiet",
        "a E4 square note, loud",
        "a A4 sawtooth note, medium",
        "a C5 plucked note, loud",
    ]
    clips = torch.stack([synthesize(p) for p in prompts])
    mel = codec.encode(clips)
    assert mel.shape == (4, 1, 32, 16) and mel.min() >= -1 and mel.max() <= 1
    audio = codec.decode(mel)
    assert audio.shape == clips.shape
    assert torch.equal(codec.decode(mel), audio)  # zero initial phase: deterministic
    samples = AudioSamples(audio, 8000)
    assert PitchAccuracy()(samples, Cond({"prompt": prompts})).scores.min() > 0.85
    assert (integrated_lufs(audio, 8000) - integrated_lufs(clips, 8000)).abs().max() < 1.5
    assert codec.decode(-torch.ones(1, 1, 32, 4)).abs().max() == 0  # −1 is silence


def test_decode_requests_window_and_rate():
    backbone = tiny_wave_backbone()
    cond = backbone.condition(BATCH)
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    full = backbone.decode(x, mask)
    w = backbone.decode(x, mask, window=[0.016, 0.048])  # samples 128 … 384
    assert w.audio.shape[-1] == 256 and torch.equal(w.audio[1], full.audio[1, :, 128:384])
    assert w.lengths.tolist() == [128, 256, 128]  # one-note clips end at 256 samples
    up = backbone.decode(x, mask, sample_rate=16000)
    assert up.sample_rate == 16000 and up.lengths.tolist() == [512, 1024, 512]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1 = backbone.decode(x, mask, random_window=0.01, generator=g1)
    r2 = backbone.decode(x, mask, random_window=0.01, generator=g2)
    assert torch.equal(r1.audio, r2.audio) and r1.audio.shape[-1] == 80
    with pytest.raises(ValueError, match="unknown"):
        backbone.decode(x, mask, frames="random")


def test_layout_selects_rows_and_concatenates():
    s = AudioSamples(torch.ones(3, 1, 10), 8000, [10, 4, 0])
    assert s.audio[1, 0, 4:].abs().max() == 0 and s.mask.shape == (3, 1, 10)
    part = s[1:]
    assert isinstance(part, AudioSamples) and part.lengths.tolist() == [4, 0] and part.sample_rate == 8000
    both = AudioSamples.cat([s, part])
    assert isinstance(both, AudioSamples) and len(both) == 5
    assert s.durations.tolist() == pytest.approx([10 / 8000, 4 / 8000, 0])
    with pytest.raises(ValueError, match="lengths"):
        AudioSamples(torch.ones(2, 1, 10), 8000, [11, 2])


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_classifier_free_guidance_and_unconditional_rows(kind):
    backbone = BACKBONES[kind]()
    cond = backbone.condition(BATCH)
    null = cond.replace(**backbone.null_condition(cond))
    assert null["tokens"].abs().sum() == 0 and torch.equal(null["num_notes"], cond["num_notes"])
    policy = DiffusionPolicy(backbone, kernel(backbone), num_steps=2, guidance_scale=3.0)
    traj = policy.rollout(cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.x0).all()


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_lora_trains_adapters_only_and_reference_is_the_base(kind):
    from diffalign.core.lora import LoRABackbone

    targets = ["to_q", "to_k", "to_v"] if kind == "mel" else ["query", "key", "value"]
    backbone = LoRABackbone(BACKBONES[kind](), rank=2, target_modules=targets)
    check_backbone(backbone, BATCH, kernel(backbone))
    names = {n for n, p in backbone.inner.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.1)
    cond = backbone.condition(BATCH)
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((3,), 300)
    with backbone.reference() as ref:
        base = ref.denoise(x, t, cond, mask)
    assert not torch.allclose(backbone.denoise(x, t, cond, mask), base)


def test_prompts_that_do_not_fit_raise():
    backbone = tiny_mel_backbone()
    with pytest.raises(ValueError, match="at most 2"):
        backbone.condition({"prompt": ["a C4 D4 E4 melody"]})
    with pytest.raises(ValueError, match="names 0 notes"):
        backbone.condition({"prompt": ["a square sound"]})
    with pytest.raises(KeyError, match="prompt"):
        backbone.condition({"text": ["a C4 note"]})
