"""ImageBackbone: the core contract in pixel and latent space, the sample layout, weights and errors."""

import pytest
import torch

from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import check_backbone
from diffalign.modalities.image import ImageBackbone, from_sample_layout, to_sample_layout
from diffalign.modalities.image.testing import save_tiny_vae, tiny_image_backbone

PROMPTS = {"prompt": ["a handwritten 3", "a handwritten seven", "a cat"]}


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae")


def test_pixel_backbone_fits_the_core():
    check_backbone(tiny_image_backbone(), PROMPTS)


def test_latent_backbone_fits_the_core(vae_folder):
    backbone = tiny_image_backbone(vae_folder)
    check_backbone(backbone, PROMPTS)
    names = {n for n, _ in backbone.named_parameters()}
    assert not any("vae" in n for n in names), "the VAE must stay out of parameters and checkpoints"
    assert not any(k.startswith("_vae") for k in backbone.state_dict())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_scheduler_agrees_with_prediction_type(prediction_type):
    backbone = tiny_image_backbone(prediction_type=prediction_type)
    assert backbone.make_scheduler().config.prediction_type == prediction_type
    DiffusionPolicy(backbone, num_steps=2)  # raises on a mismatch


def test_decode_layout_and_round_trip():
    backbone = tiny_image_backbone()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    images = backbone.decode(x)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.allclose(backbone.encode(images)[0], x, atol=1e-6)  # RGB layout back to model space
    assert torch.allclose(backbone.encode(images[:, :1])[0], x, atol=1e-6)  # grayscale (B, 1, H, W) too
    assert backbone.decode(torch.full((1, 1, 8, 8), 5.0)).max() == 1.0  # out-of-range values are clamped


def test_layout_helpers_validate_shapes():
    with pytest.raises(ValueError, match="expected images"):
        from_sample_layout(torch.rand(2, 8, 8), 1)
    with pytest.raises(ValueError, match="RGB"):
        to_sample_layout(torch.rand(2, 2, 8, 8))
    rgb = from_sample_layout(torch.rand(2, 1, 4, 4), 3)
    assert rgb.shape == (2, 3, 4, 4)


def test_latent_encode_decode_shapes(vae_folder):
    backbone = tiny_image_backbone(vae_folder)
    cond = backbone.condition({"prompt": ["a handwritten 1"] * 2})
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8) and mask is None
    images = backbone.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert backbone.encode(images)[0].shape == (2, 4, 8, 8)


def test_decode_is_differentiable():
    backbone = tiny_image_backbone()
    x = (torch.rand(2, 1, 8, 8) - 0.5).requires_grad_()
    backbone.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weights_round_trip_and_mismatch_names_file(tmp_path):
    from diffalign.core.io import save_state_dict

    a = tiny_image_backbone()
    path = save_state_dict(a, tmp_path / "w.safetensors")
    b = tiny_image_backbone()
    from diffalign.core.io import load_state_dict

    load_state_dict(b, path)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    with pytest.raises(RuntimeError, match="w.safetensors"):
        ImageBackbone(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ImageBackbone(weights=str(tmp_path / "missing.safetensors"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="prediction_type"):
        ImageBackbone(prediction_type="x0", weights=None)
    with pytest.raises(ValueError, match="block types"):
        ImageBackbone(block_out_channels=(8, 16), down_block_types=("DownBlock2D",), weights=None)
    with pytest.raises(KeyError, match="prompt"):
        tiny_image_backbone().condition({"text": ["x"]})
