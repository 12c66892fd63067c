"""StableDiffusionBackbone on a tiny random-weight pipeline folder (same classes and layout as SD 1.5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffalign.core.testing import check_backbone
from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone, make_tiny_sd_pipeline
from tests.helpers import quiet_trainer

RES = 16  # tiny VAE factor 2 -> 8x8 latents
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> Path:
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny_sd")


def _backbone(
    path: Path, lora_rank: int = 0, lora_alpha: float | None = None, lora_path=None, base_dtype=None, **kw
):
    """The tiny SD backbone, wrapped in the core's one LoRA path when `lora_rank` > 0."""
    from diffalign.core.lora import LoRABackbone

    bb = StableDiffusionBackbone(str(path), resolution=RES, **kw)
    if not lora_rank:
        return bb
    return LoRABackbone(bb, rank=lora_rank, alpha=lora_alpha, weights=lora_path, base_dtype=base_dtype)


def _perturb_lora(backbone: StableDiffusionBackbone) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in backbone.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def _denoise_out(backbone, cond, seed: int = 0) -> torch.Tensor:
    x, _ = backbone.init_noise(cond, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone.denoise(x, torch.tensor([500, 250]), cond)


def test_loads_every_part_from_the_local_folder(sd_path):
    bb = _backbone(sd_path)
    assert bb.prediction_type == "epsilon"
    assert (bb.latent_channels, bb.latent_size, bb.vae_scale_factor) == (4, RES // 2, 2)
    s1, s2 = bb.make_scheduler(), bb.make_scheduler()
    assert type(s1).__name__ == "PNDMScheduler" and s1 is not s2  # fresh, from the saved config
    assert s1.config.steps_offset == 1 and s1.config.beta_schedule == "scaled_linear"
    assert len(bb.tokenizer) > 60  # not transformers' silent 2-token fallback
    assert not bb.vae.training and not bb.text_encoder.training
    bb.train()
    assert bb.unet.training and not bb.vae.training and not bb.text_encoder.training


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_part_raises_naming_it(sd_path, tmp_path, part):
    broken = tmp_path / "sd"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(FileNotFoundError, match=rf"'{part}' is missing: no folder .*{part}"):
        _backbone(broken)


def test_missing_weights_and_missing_root_raise_clearly(sd_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        _backbone(tmp_path / "nowhere")
    broken = tmp_path / "sd"
    shutil.copytree(sd_path, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"'unet' is incomplete: .*\.safetensors"):
        _backbone(broken)


@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_check_backbone_contract(sd_path, lora_rank):
    check_backbone(_backbone(sd_path, lora_rank=lora_rank), {"prompt": PROMPTS})


def test_lora_trains_only_adapters(sd_path):
    bb = _backbone(sd_path, lora_rank=4, lora_alpha=8, base_dtype="bfloat16")
    assert bb.unet.conv_in.weight.dtype == torch.bfloat16  # the frozen base in bf16, adapters float32
    trainable = dict((id(p), p) for p in bb.trainable_parameters())
    names = [n for n, p in bb.named_parameters() if id(p) in trainable]
    assert names and all("lora_" in n for n in names)
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == set(names)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any(p.requires_grad for p in bb.vae.parameters())
    assert not any(p.requires_grad for p in bb.text_encoder.parameters())
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0


def test_reference_is_the_base_model_with_adapters_off(sd_path):
    base = _backbone(sd_path, lora_rank=0)
    bb = _backbone(sd_path, lora_rank=4)
    cond = bb.condition({"prompt": PROMPTS})
    expected = _denoise_out(base, cond)
    assert torch.allclose(_denoise_out(bb, cond), expected, atol=1e-5)  # B = 0 at init
    bb.freeze_reference()  # a no-op with LoRA: no copy is kept
    assert not bb._reference_copy and not bb.inner._reference_copy
    _perturb_lora(bb)
    adapted = _denoise_out(bb, cond)
    assert (adapted - expected).abs().max() > 1e-3
    with bb.reference() as ref:
        assert torch.allclose(_denoise_out(ref, cond), expected, atol=1e-5)
    assert torch.equal(_denoise_out(bb, cond), adapted)  # adapters are back on, and trainable
    assert all(p.requires_grad for p in bb.trainable_parameters())
    assert len(list(bb.trainable_parameters())) > 0

    # DPOK's order: a graph through the adapters, then the reference inside the context, then backward
    x, _ = bb.init_noise(cond, torch.Generator().manual_seed(1))
    out = bb.denoise(x, torch.tensor([500, 250]), cond)
    with bb.reference() as ref:
        base_out = ref.denoise(x, torch.tensor([500, 250]), cond)
    assert not base_out.requires_grad
    ((out - base_out) ** 2).mean().backward()
    grads = [p.grad for p in bb.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_full_finetune_reference_is_a_frozen_unet_copy(sd_path):
    bb = _backbone(sd_path, lora_rank=0)
    cond = bb.condition({"prompt": PROMPTS})
    before = _denoise_out(bb, cond)
    bb.freeze_reference()
    (ref_copy,) = bb._reference_copy  # the frozen VAE and text encoder are shared, not copied
    assert (
        ref_copy.vae is bb.vae and ref_copy.text_encoder is bb.text_encoder and ref_copy.unet is not bb.unet
    )
    with torch.no_grad():
        for p in bb.unet.parameters():
            p.mul_(1.1)
    assert (_denoise_out(bb, cond) - before).abs().max() > 1e-4
    with bb.reference() as ref:
        assert torch.allclose(_denoise_out(ref, cond), before, atol=1e-6)


def test_decode_layout_range_and_gradient(sd_path):
    bb = _backbone(sd_path)
    cond = bb.condition({"prompt": PROMPTS})
    x, mask = bb.init_noise(cond, torch.Generator().manual_seed(0))
    assert mask is None and x.shape == (2, 4, RES // 2, RES // 2) and x.dtype == torch.float32
    z = (3 * x).requires_grad_(True)
    images = bb.decode(z)
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # frozen VAE, yet differentiable in the latents
    latents, mask = bb.encode(images.detach())
    assert mask is None
    assert latents.shape == x.shape
    dist = bb.vae.encode(images.detach() * 2 - 1).latent_dist
    assert torch.allclose(latents, dist.mean * bb.scaling_factor, atol=1e-6)  # "mean" mode
    # decode(z) computes vae.decode(z / scaling): check the scaling against the VAE called directly
    direct = (bb.vae.decode(x / bb.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(bb.decode(x), direct, atol=1e-6)


def test_condition_carries_the_prompt_text_and_guidance_works(sd_path):
    bb = _backbone(sd_path)
    cond = bb.condition({"prompt": PROMPTS})
    hs = cond["encoder_hidden_states"]
    assert hs.shape == (2, bb.tokenizer.model_max_length, bb.text_encoder.config.hidden_size)
    assert not hs.requires_grad
    assert cond["prompt"] == PROMPTS  # metadata beside the tensors: rewards read the text directly
    null = bb.null_condition(cond)
    assert set(null) == {"encoder_hidden_states"}
    empty = bb.condition({"prompt": ["", ""]})["encoder_hidden_states"]
    assert torch.allclose(null["encoder_hidden_states"], empty)
    assert not torch.allclose(empty, hs)
    from diffalign.core.policy import DiffusionPolicy

    policy = DiffusionPolicy(bb, num_steps=2, guidance_scale=5.0)  # CFG concatenates every cond entry
    traj = policy.rollout(cond, torch.Generator().manual_seed(0))
    assert traj.cond["prompt"] == PROMPTS
    assert traj.states.shape == (2, 3, 4, RES // 2, RES // 2)
    lp = policy.log_prob(traj, 1).log_prob
    assert torch.allclose(lp, traj.log_probs[:, 1], atol=1e-5)


def test_options_bf16_checkpointing_and_v_prediction(sd_path, tmp_path):
    bb = _backbone(sd_path, lora_rank=4, base_dtype="bfloat16", dtype="bfloat16", gradient_checkpointing=True)
    assert bb.unet.is_gradient_checkpointing
    assert bb.vae.dtype == torch.bfloat16 and bb.text_encoder.dtype == torch.bfloat16
    assert bb.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bb.trainable_parameters())
    cond = bb.condition({"prompt": PROMPTS})
    assert _denoise_out(bb, cond).dtype == torch.float32
    assert bb.decode(bb.init_noise(cond)[0]).dtype == torch.float32
    check_backbone(bb, {"prompt": PROMPTS})  # re-scoring stays exact with bf16 frozen weights

    v_path = make_tiny_sd_pipeline(tmp_path / "v", scheduler="ddim", prediction_type="v_prediction")
    assert _backbone(v_path).prediction_type == "v_prediction"
    assert _backbone(sd_path, prediction_type="v_prediction").make_scheduler().config.prediction_type == (
        "v_prediction"
    )


@pytest.mark.slow
def test_two_step_ddpo_checkpoint_holds_only_lora(sd_path, tmp_path):

    from diffalign.core.algorithms import DDPO
    from diffalign.core.data import PromptDataModule
    from diffalign.core.module import AlignmentModule
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.testing import LinearReward

    def build() -> AlignmentModule:
        policy = DiffusionPolicy(_backbone(sd_path, lora_rank=2), num_steps=2)
        return AlignmentModule(
            policy,
            DDPO(advantages="batch"),
            LinearReward(),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
            checkpoint_frozen_weights=False,
        )

    module = build()
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = quiet_trainer(
        max_steps=2,
        default_root_dir=tmp_path,
    )
    data = PromptDataModule(prompts=PROMPTS, batch_size=2, batches_per_epoch=2, eval_seeds_per_prompt=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert changed and all("lora_" in n for n in changed)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    weights = {k for k in state if not k.endswith("_extra_state")}  # algorithm state is not a weight
    assert weights == set(start) and all("lora_" in k for k in weights), sorted(weights - set(start))[:5]

    fresh = build()  # frozen weights come back from the folder, adapters from the checkpoint
    fresh.load_state_dict(state, strict=False)
    for n, p in fresh.named_parameters():
        if n in weights:
            assert torch.equal(p, state[n])
    assert sum(n in weights for n, _ in fresh.named_parameters()) == len(weights)

    # docs/stable_diffusion.md: the adapters of a run's checkpoint into a bare backbone, then exported
    bb = _backbone(sd_path, lora_rank=2)
    prefix = "policy.backbone."
    bb.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    trained = module.policy.backbone
    cond = bb.condition({"prompt": PROMPTS})
    assert torch.allclose(_denoise_out(bb, cond), _denoise_out(trained, cond), atol=1e-6)
    assert bb.save_lora(tmp_path / "lora").is_file()


def test_lora_export_loads_in_diffusers_and_back(sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    bb = _backbone(sd_path, lora_rank=2, lora_alpha=8)
    _perturb_lora(bb)
    cond = bb.condition({"prompt": PROMPTS})
    adapted = _denoise_out(bb, cond)
    file = bb.save_lora(tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors" and file.stat().st_size < 200_000

    again = _backbone(sd_path, lora_rank=2, lora_alpha=8, lora_path=str(tmp_path / "lora"))
    assert torch.allclose(_denoise_out(again, cond), adapted, atol=1e-6)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in again.trainable_parameters())

    pipe = StableDiffusionPipeline.from_pretrained(
        str(sd_path), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    # a stock diffusers pipeline reads the export (offline, diffusers 0.36 needs the weight_name)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=file.name)
    x, _ = bb.init_noise(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.unet(
            x, torch.tensor([500, 250]), encoder_hidden_states=cond["encoder_hidden_states"]
        ).sample
    assert torch.allclose(out, adapted, atol=1e-5)

    with pytest.raises(ValueError, match="do not fit these adapters"):
        _backbone(sd_path, lora_rank=4, lora_path=str(tmp_path / "lora"))
    with pytest.raises(FileNotFoundError, match="not found: .*nope"):
        _backbone(sd_path, lora_rank=2, lora_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        _backbone(sd_path).save_lora(tmp_path / "none")
