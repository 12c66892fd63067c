"""WanBackbone on a tiny random Wan 2.1 pipeline saved to a temp folder: the core contract, LoRA with the
reference = adapters off, frozen VAE / text encoder, frame-subsampled (exact, causal) decode, gradient
checkpointing, and clear errors for a missing folder."""

import json

import pytest
import torch

from diffalign.core.kernels import FlowSDEKernel
from diffalign.core.lora import LoRABackbone
from diffalign.core.testing import check_backbone
from diffalign.modalities.video.wan import WanBackbone, save_tiny_wan_pipeline

BATCH = {"prompt": ["a 3 moving left, fast", "a cat video", {"digit": 1, "direction": "up", "speed": "slow"}]}
TINY = dict(num_frames=9, height=32, width=32, max_sequence_length=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "tiny_wan")


@pytest.fixture(scope="module")
def backbone(folder):
    return WanBackbone(str(folder), **TINY)


def test_folder_is_a_wan_pipeline(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"][1] == "WanTransformer3DModel"


def test_wan_backbone_fits_the_core(backbone):
    check_backbone(backbone, BATCH, FlowSDEKernel(noise_level=0.7), num_steps=2)
    assert not any(k.startswith(("_vae", "_text_encoder")) for k in backbone.state_dict())
    assert all(n.startswith("transformer.") for n, _ in backbone.named_parameters())


def test_lora_reference_is_the_base_with_adapters_off(folder):
    lora = LoRABackbone(
        WanBackbone(str(folder), **TINY), rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    check_backbone(lora, BATCH, FlowSDEKernel(noise_level=0.7), num_steps=2)
    cond = lora.condition(BATCH)
    x, _ = lora.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((3,), 600.0)
    with torch.no_grad():
        base = lora.denoise(x, t, cond)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
        adapted = lora.denoise(x, t, cond)
        with lora.reference() as ref:
            reference = ref.denoise(x, t, cond)
    assert not torch.allclose(adapted, base) and torch.allclose(reference, base)
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_frame_subsampled_decode_is_exact_and_decodes_only_the_prefix(backbone):
    cond = backbone.condition(BATCH)
    x0, _ = backbone.init_noise(cond, torch.Generator().manual_seed(1))
    assert x0.shape == (3, 4, 3, 4, 4)  # 9 frames → 3 latent frames; 32 px → 4
    seen = []
    vae = backbone._vae[0]
    original = vae.decode

    def recording(z, *args, **kwargs):
        seen.append(z.shape[2])
        return original(z, *args, **kwargs)

    vae.decode = recording
    try:
        full = backbone.decode(x0)
        first = backbone.decode(x0, frames=[0])
        fml = backbone.decode(x0, frames="first_middle_last")
        early = backbone.decode(x0, frames=[1, 3])
    finally:
        vae.decode = original
    assert full.shape == (3, 9, 3, 32, 32) and full.min() >= 0 and full.max() <= 1
    assert seen == [3, 1, 3, 2]  # latent frames decoded: all, one, all (frame 8), two (frames ≤ 4)
    assert torch.allclose(first, full[:, :1], atol=1e-6)
    assert torch.allclose(fml, full[:, [0, 4, 8]], atol=1e-6)
    assert torch.allclose(early, full[:, [1, 3]], atol=1e-6)
    one = backbone.decode(x0, frames="random", generator=torch.Generator().manual_seed(0))
    assert one.shape == (3, 1, 3, 32, 32)
    latents, mask = backbone.encode(full)
    assert latents.shape == x0.shape and mask is None


def test_decode_keeps_the_graph_for_reward_backprop(backbone):
    x0 = torch.randn(1, 4, 3, 4, 4, requires_grad=True)
    backbone.decode(x0, frames=[0]).mean().backward()
    assert x0.grad[:, :, 0].abs().sum() > 0 and x0.grad[:, :, 1:].abs().sum() == 0  # causal: frame 0 only


def test_gradient_checkpointing_gives_the_same_gradients(folder):
    grads = []
    for checkpointing in (False, True):
        b = WanBackbone(str(folder), **TINY, gradient_checkpointing=checkpointing)
        assert b.transformer.gradient_checkpointing == checkpointing
        cond = b.condition(BATCH)
        x, _ = b.init_noise(cond, torch.Generator().manual_seed(2))
        b.denoise(x, torch.full((3,), 400.0), cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.transformer.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_null_condition_is_the_negative_prompt(backbone):
    cond = backbone.condition(BATCH)
    null = backbone.null_condition(cond)["prompt_embeds"]
    assert null.shape == cond["prompt_embeds"].shape
    assert torch.allclose(null[0], backbone.embed([""])[0]) and torch.equal(null[0], null[2])


def test_missing_or_incomplete_folders_are_named(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        WanBackbone(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks.*transformer"):
        WanBackbone(str(partial))
    with pytest.raises(ValueError, match="num_frames"):
        WanBackbone(str(folder), num_frames=8, height=32, width=32)
    with pytest.raises(ValueError, match="height"):
        WanBackbone(str(folder), num_frames=9, height=40, width=32)
