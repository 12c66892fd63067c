"""AudioLDM from a local folder, on a tiny random-weight pipeline saved to a temp folder (nothing downloads):
the contract, parity with diffusers' own pipeline, LoRA with the reference = adapters off, clear errors."""

import warnings

import pytest
import torch

from diffalign.core.kernels import DDIMKernel
from diffalign.core.lora import LoRABackbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import check_backbone
from diffalign.modalities.audio import AudioSamples
from diffalign.modalities.audio.audioldm import AudioLDMBackbone, make_tiny_audioldm_pipeline

PROMPTS = {"prompt": ["a dog barking", "rain on a roof"]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_audioldm_pipeline(tmp_path_factory.mktemp("audioldm") / "tiny")


def test_contract_and_layout(tiny_folder):
    backbone = AudioLDMBackbone(str(tiny_folder), audio_length_s=0.032)
    check_backbone(backbone, PROMPTS)
    cond = backbone.condition(PROMPTS)
    assert cond["text_embeds"].norm(dim=-1).sub(1).abs().max() < 1e-5  # L2-normalised CLAP embeddings
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    assert mask is None and x.shape == (2, 4, 16, 4)
    samples = backbone.decode(x)
    assert (
        isinstance(samples, AudioSamples)
        and samples.sample_rate == 16000
        and samples.audio.shape == (2, 1, 512)
    )
    assert backbone.decode(x, window=[0.0, 0.016]).audio.shape[-1] == 256
    z, _ = backbone.encode(samples)
    assert z.shape == x.shape


def test_sampling_matches_the_diffusers_pipeline(tiny_folder):
    """Same initial latents, DDIM with eta 0, no guidance: our rollout + decode equals AudioLDMPipeline."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AudioLDMPipeline

        pipe = AudioLDMPipeline.from_pretrained(str(tiny_folder), local_files_only=True)
    backbone = AudioLDMBackbone(str(tiny_folder), audio_length_s=0.032)
    cond = backbone.condition(PROMPTS)
    x_T, _ = backbone.init_noise(cond, torch.Generator().manual_seed(3))
    policy = DiffusionPolicy(backbone, DDIMKernel(eta=0.0), num_steps=3)
    with torch.no_grad():
        ours = backbone.decode(policy.rollout(cond, x_T=x_T).x0).audio[:, 0]
        theirs = pipe(
            PROMPTS["prompt"], num_inference_steps=3, guidance_scale=1.0, audio_length_in_s=0.032,
            latents=x_T.clone(), output_type="pt",
        ).audios  # fmt: skip
    assert torch.allclose(ours, torch.as_tensor(theirs).float(), atol=1e-4)


def test_lora_adapts_the_unet_only_and_the_reference_is_the_base(tiny_folder):
    backbone = LoRABackbone(
        AudioLDMBackbone(str(tiny_folder), audio_length_s=0.032),
        rank=2,
        target_modules=["to_q", "to_k", "to_v"],
    )
    check_backbone(backbone, PROMPTS)
    trainable = [n for n, p in backbone.inner.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.05)
    cond = backbone.condition(PROMPTS)
    x, _ = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((2,), 500)
    with backbone.reference() as ref:
        base = ref.denoise(x, t, cond)
    assert not torch.allclose(backbone.denoise(x, t, cond), base)
    assert set(backbone.inner.frozen_modules) == {"vae", "text_encoder", "vocoder"}


def test_missing_parts_are_named(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AudioLDMBackbone(str(tmp_path / "nowhere"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vocoder")
    with pytest.raises(FileNotFoundError, match="'vocoder' is missing"):
        AudioLDMBackbone(str(broken))
