"""Speed options on the Stable Diffusion backbone (tiny random weights): channels_last, chunked VAE decode,
SDPA attention, torch.compile plumbing, bf16 with the importance ratio at 1, no per-step host copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.core.algorithms import DDPO
from diffalign.core.kernels import DDIMKernel
from diffalign.core.lora import LoRABackbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward, SampleView
from diffalign.core.rollouts import AlignContext
from diffalign.core.sampling import row_generators
from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone, make_tiny_sd_pipeline
from diffalign.rewards.image import JpegCompressibility
from tests.core.test_speed_options import meta_rollout_copies

RES = 16
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> Path:
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny_sd", scheduler="ddim")


def _sd(path: Path, **kw) -> StableDiffusionBackbone:
    return StableDiffusionBackbone(str(path), resolution=RES, **kw)


def test_attention_runs_through_scaled_dot_product_attention(sd_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    bb = _sd(sd_path)
    for net in (bb.unet, bb.vae):
        kinds = {type(p) for p in net.attn_processors.values()}
        assert kinds == {AttnProcessor2_0}, kinds


def test_channels_last_is_the_same_computation(sd_path):
    plain, nhwc = _sd(sd_path), _sd(sd_path, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    cond = plain.condition({"prompt": PROMPTS})
    x, _ = plain.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.tensor([700, 300])
    with torch.no_grad():
        a, b = plain.denoise(x, t, cond), nhwc.denoise(x, t, cond)
        assert b.is_contiguous() and torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(plain.decode(x), nhwc.decode(x), atol=1e-5)


def test_vae_decodes_in_chunks_of_decode_chunk_size(sd_path):
    bb = LoRABackbone(_sd(sd_path, decode_chunk_size=2), rank=2)
    assert bb.decode_chunk_size == 2
    calls = []
    original = bb.inner.vae.decode

    def counting(z, *a, **k):
        calls.append(z.shape[0])
        return original(z, *a, **k)

    bb.inner.vae.decode = counting
    x0 = torch.randn(5, 4, 8, 8)
    images = SampleView(bb, x0).get({})
    assert calls == [2, 2, 1] and images.shape == (5, 3, RES, RES)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        _sd(sd_path, decode_chunk_size=0)


def test_sd_rollout_with_lora_and_guidance_copies_nothing_per_step(sd_path):
    bb = LoRABackbone(_sd(sd_path), rank=2)
    cond = bb.condition({"prompt": PROMPTS})
    bb.to("meta")
    policy = DiffusionPolicy(bb, DDIMKernel(eta=1.0), num_steps=2, guidance_scale=5.0)
    first = meta_rollout_copies(policy, cond.to("meta"), (4, 8, 8), 2)
    assert meta_rollout_copies(policy, cond.to("meta"), (4, 8, 8), 5) == 1 <= first


@pytest.mark.parametrize("lora", [True, False], ids=["lora-bf16-base", "full-autocast-bf16"])
def test_bf16_ddpo_ratio_is_one_before_the_first_update(sd_path, lora):
    """TRL 0.23.1 re-scores in bf16 and starts with clipfrac ≈ 0.9; here kernels run in float32, so the
    re-scored log-probs equal the sampled ones exactly: first_update_ratio_dev == 0."""
    torch.manual_seed(0)
    if lora:
        bb = LoRABackbone(_sd(sd_path, dtype="bfloat16"), rank=2, base_dtype="bfloat16")
        policy = DiffusionPolicy(bb, DDIMKernel(eta=1.0), num_steps=3, guidance_scale=5.0)
    else:
        policy = DiffusionPolicy(
            _sd(sd_path, dtype="bfloat16"),
            DDIMKernel(eta=1.0),
            num_steps=3,
            guidance_scale=5.0,
            autocast="bfloat16",
        )
    algo = DDPO(advantages="batch", train_batch_size=2)
    ctx = AlignContext(
        policy, GuardedReward(JpegCompressibility(), "raise"), torch.Generator().manual_seed(0), "cpu"
    )
    data, _ = algo.prepare(ctx, {"prompt": PROMPTS * 2})
    devs = [
        float(algo(policy, micro)["ratio_max_dev"])
        for micro in next(iter(algo.minibatches(data, ctx.generator)))
    ]
    assert len(devs) == 3 and max(devs) == 0.0, devs


@pytest.mark.slow
def test_compile_flag_compiles_the_unet_in_place(sd_path):
    """torch.compile plumbing on CPU with the `eager` backend (no code generation); the GPU run measures
    inductor and CUDA graphs (benchmarks/sd_gpu.py)."""
    torch._dynamo.reset()
    eager = LoRABackbone(_sd(sd_path), rank=2)
    names = sorted(n for n, _ in eager.named_parameters())
    compiled = LoRABackbone(_sd(sd_path), rank=2)
    policy = DiffusionPolicy(compiled, num_steps=2, guidance_scale=3.0, compile={"backend": "eager"})
    assert compiled.inner.unet._compiled_call_impl is not None
    assert sorted(n for n, _ in compiled.named_parameters()) == names  # checkpoints are unchanged
    cond = compiled.condition({"prompt": PROMPTS})
    a = policy.sample(cond, row_generators([1, 2]))
    b = DiffusionPolicy(eager, num_steps=2, guidance_scale=3.0).sample(cond, row_generators([1, 2]))
    assert torch.allclose(a, b, atol=1e-5)
