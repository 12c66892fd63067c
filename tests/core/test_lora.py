"""LoRABackbone: adapters on any backbone, base frozen, the reference is the adapters switched off."""

import pytest
import torch

from diffalign.core.algorithms import DPOK, AlignContext
from diffalign.core.lora import LoRABackbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward
from diffalign.core.testing import LinearReward, ToyBackbone, check_backbone
from diffalign.modalities.image.testing import tiny_image_backbone


def _toy() -> LoRABackbone:
    torch.manual_seed(0)
    return LoRABackbone(ToyBackbone(hidden=16, depth=2), rank=2, target_modules=["net.0", "net.2"])


def _perturb(backbone: LoRABackbone) -> None:
    with torch.no_grad():
        for n, p in backbone.inner.named_parameters():
            if "lora_B" in n:
                p.normal_()


def test_starts_equal_to_the_base_and_trains_only_adapters():
    base = ToyBackbone(hidden=16, depth=2)
    x, t, cond = (
        torch.randn(4, 2),
        torch.tensor([100, 200, 300, 400]),
        base.condition({"prompt": [0, 1, 2, 3]}),
    )
    before = base.denoise(x, t, cond).detach()
    lora = LoRABackbone(base, rank=2, target_modules=["net.0", "net.2"])
    assert torch.allclose(lora.denoise(x, t, cond), before)
    trainable = list(lora.trainable_parameters())
    assert trainable and all(p.requires_grad for p in trainable)
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in lora.parameters()) / 4


def test_reference_is_the_base_with_adapters_off_and_no_copy():
    lora = _toy()
    x, t, cond = (
        torch.randn(4, 2),
        torch.tensor([100, 200, 300, 400]),
        lora.condition({"prompt": [0, 1, 2, 3]}),
    )
    base_out = lora.denoise(x, t, cond).detach()
    _perturb(lora)
    adapted = lora.denoise(x, t, cond).detach()
    assert (adapted - base_out).abs().max() > 1e-3
    lora.freeze_reference()
    with lora.reference() as ref:
        assert ref is lora.inner  # the same weights, not a deep copy
        assert torch.allclose(ref.denoise(x, t, cond), base_out, atol=1e-6)
    # adapters are back on, and still the only trainable weights
    assert torch.allclose(lora.denoise(x, t, cond), adapted)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {
        n for n, _ in lora.named_parameters() if "lora_" in n
    }


def test_fits_the_core_contract_on_a_diffusers_unet():
    lora = LoRABackbone(tiny_image_backbone(), rank=2)
    check_backbone(lora, {"prompt": ["a handwritten 1", "a handwritten 7"]}, num_steps=2)
    assert lora.sample_size == lora.inner.sample_size  # other attributes pass through


def test_dpok_kl_is_zero_before_training_and_positive_after(tmp_path):
    lora = _toy()
    policy = DiffusionPolicy(lora, num_steps=3)
    ctx = AlignContext(
        policy, GuardedReward(LinearReward()), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    algo = DPOK(kl_coef=1.0)
    lora.freeze_reference()
    traj, _ = algo.prepare(ctx, {"prompt": [0, 1, 2, 3]})
    micro = next(iter(algo.minibatches(traj, torch.Generator().manual_seed(0))))[0]
    assert algo(policy, micro)["kl"].item() == pytest.approx(0.0, abs=1e-10)
    _perturb(lora)
    out = algo(policy, micro)
    assert out["kl"].item() > 1e-4
    out["loss"].backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)


def test_adapters_save_and_load(tmp_path):
    a = _toy()
    _perturb(a)
    path = a.save_adapters(tmp_path / "adapters.safetensors")
    b = _toy()
    b.load_adapters(str(path))
    x, t, cond = torch.randn(2, 2), torch.tensor([10, 500]), a.condition({"prompt": [0, 1]})
    assert torch.allclose(a.denoise(x, t, cond), b.denoise(x, t, cond))
    other_rank = LoRABackbone(ToyBackbone(hidden=16, depth=2), rank=3, target_modules=["net.0", "net.2"])
    with pytest.raises(ValueError, match="other shapes"):
        other_rank.load_adapters(str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        b.load_adapters(str(tmp_path / "missing.safetensors"))


def test_unknown_target_modules_are_named():
    with pytest.raises(ValueError, match="match no module of ToyBackbone"):
        LoRABackbone(ToyBackbone(hidden=16, depth=2), target_modules=["to_q"])
