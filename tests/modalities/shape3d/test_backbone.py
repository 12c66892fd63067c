"""ShapeBackbone: the core contract (flow, ε, colour, LoRA), permutation equivariance, masks, layout."""

import pytest
import torch

from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import check_backbone
from diffalign.modalities.shape3d import ShapeBackbone
from diffalign.modalities.shape3d.testing import tiny_shape_backbone

PROMPTS = {"prompt": ["a tall cylinder", "a box", {"shape": "cone", "num_points": 7}, "a cat"]}


@pytest.mark.parametrize(
    "overrides,kernel",
    [
        ({}, FlowSDEKernel(0.7)),
        ({"prediction_type": "epsilon"}, DDIMKernel(1.0)),
        ({"color_channels": 3}, None),
    ],
    ids=["flow", "epsilon", "colour"],
)
def test_backbone_fits_the_core(overrides, kernel):
    backbone = tiny_shape_backbone(**overrides)
    kernel = kernel or (FlowSDEKernel(0.7) if backbone.prediction_type == "flow" else DDIMKernel(1.0))
    check_backbone(backbone, PROMPTS, kernel)


def test_lora_backbone_fits_the_core_and_trains_only_adapters():
    from diffalign.core.lora import LoRABackbone

    lora = LoRABackbone(tiny_shape_backbone(), rank=2, target_modules=["qkv", "proj"])
    check_backbone(lora, PROMPTS, FlowSDEKernel(0.7))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)


def _inputs(backbone, b=3, seed=0):
    cond = backbone.condition({"prompt": ["a box", "a tall cone", "a sphere"][:b]})
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(seed))
    return x, mask, cond, torch.tensor([700] * b)


def test_denoiser_is_permutation_equivariant():
    backbone = tiny_shape_backbone()
    x, mask, cond, t = _inputs(backbone)
    out = backbone.denoise(x, t, cond, mask)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # any permutation of the points, padding included, permutes the output alike
        perm = torch.randperm(x.shape[1], generator=g)
        out_p = backbone.denoise(x[:, perm], t, cond, mask[:, perm])
        assert torch.allclose(out_p, out[:, perm], atol=1e-5)
    assert not torch.allclose(out[:, :1], out[:, 1:2], atol=1e-4)  # points are not all treated alike


def test_padding_is_zero_and_invisible_to_real_points():
    backbone = tiny_shape_backbone()
    x, mask, cond, t = _inputs(backbone)
    assert (mask.sum(1) < backbone.max_points).any(), "the test needs padded rows"
    pad = mask == 0
    assert torch.equal(x[pad], torch.zeros_like(x[pad]))
    out = backbone.denoise(x, t, cond, mask)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    garbage = torch.where(pad[..., None], torch.randn_like(x) * 100, x)  # real points must not see padding
    assert torch.allclose(backbone.denoise(garbage, t, cond, mask)[~pad], out[~pad], atol=1e-5)


def test_point_counts_come_from_the_condition_or_the_row_seed():
    backbone = tiny_shape_backbone()
    cond = backbone.condition({"prompt": [{"shape": "box", "num_points": 7}, "a box", "a box"]})
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x, mask = backbone.init_noise(cond, gens)
    counts = mask.sum(1).long().tolist()
    assert counts[0] == 7 and all(backbone.min_points <= c <= backbone.max_points for c in counts)
    # a row's count and noise depend on its own seed only (the seeding rule)
    x1, mask1 = backbone.init_noise(cond[[2]], [torch.Generator().manual_seed(3)])
    assert torch.equal(mask1[0], mask[2]) and torch.equal(x1[0], x[2])
    with pytest.raises(ValueError, match="max_points"):
        backbone.condition({"prompt": [{"shape": "box", "num_points": 99}]})


def test_null_condition_clears_attributes_and_guidance_runs():
    backbone = tiny_shape_backbone()
    cond = backbone.condition(PROMPTS)
    null = backbone.null_condition(cond)
    assert set(null) == {"shape", "aspect", "size"} and all(int(v.abs().sum()) == 0 for v in null.values())
    assert cond["shape"].tolist() == [3, 1, 4, 0] and cond["aspect"].tolist() == [2, 0, 0, 0]
    policy = DiffusionPolicy(backbone, FlowSDEKernel(0.7), num_steps=2, guidance_scale=2.0)
    traj = policy.rollout(cond, [torch.Generator().manual_seed(i) for i in range(4)])
    assert traj.x0.shape == (4, backbone.max_points, 3) and torch.isfinite(traj.x0).all()


def test_decode_layout_views_and_encode_round_trip():
    backbone = tiny_shape_backbone(color_channels=3)
    x, mask, cond, _ = _inputs(backbone)
    out = backbone.decode(x, mask)
    assert set(out) == {"points", "mask", "colors"} and out["points"].shape == (3, backbone.max_points, 3)
    assert torch.allclose(out["points"] * backbone.coordinate_scale, x[..., :3] * mask[..., None])
    x2, mask2 = backbone.encode(out)
    keep = mask[..., None] > 0
    assert torch.equal(mask2, mask) and torch.allclose(x2[..., :3], x[..., :3] * keep, atol=1e-6)
    views = backbone.decode(x, mask, views="pair", image_size=16)
    assert views["images"].shape == (3, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="takes views"):
        backbone.decode(x, mask, frames=1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = backbone.decode(x, mask, views={"random": 2}, generator=g1)["images"]
    assert torch.equal(a, backbone.decode(x, mask, views={"random": 2}, generator=g2)["images"])


def test_encode_ragged_lists_and_errors():
    backbone = tiny_shape_backbone()
    clouds = [torch.randn(5, 3), torch.randn(9, 3)]
    x, mask = backbone.encode(clouds)
    assert x.shape == (2, backbone.max_points, 3) and mask.sum(1).tolist() == [5, 9]
    assert torch.allclose(x[1, :9], clouds[1] * backbone.coordinate_scale)
    with pytest.raises(ValueError, match="at most 12"):
        backbone.encode([torch.randn(13, 3)])
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        backbone.encode([torch.randn(4, 2)])
    with pytest.raises(ValueError, match="colour model"):
        tiny_shape_backbone(color_channels=3).encode(clouds)


def test_decode_is_differentiable_through_the_renderer():
    backbone = tiny_shape_backbone()
    x, mask, _, _ = _inputs(backbone)
    x = x.clone().requires_grad_()
    backbone.decode(x, mask, views="front")["images"].mean().backward()
    assert x.grad is not None and x.grad[mask > 0].abs().sum() > 0
    assert torch.equal(x.grad[mask == 0], torch.zeros_like(x.grad[mask == 0]))


def test_scheduler_agrees_with_prediction_type_and_bad_arguments_are_named():
    for pt in ("epsilon", "v_prediction", "sample"):
        assert tiny_shape_backbone(prediction_type=pt).make_scheduler().config.prediction_type == pt
    with pytest.raises(ValueError, match="prediction_type"):
        ShapeBackbone(prediction_type="x0", weights=None)
    with pytest.raises(ValueError, match="color_channels"):
        ShapeBackbone(color_channels=2, weights=None)
    with pytest.raises(KeyError, match="prompt"):
        tiny_shape_backbone().condition({"text": ["x"]})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ShapeBackbone(weights="missing.safetensors")


def test_save_samples_writes_plys_and_a_grid(tmp_path):
    import trimesh

    backbone = tiny_shape_backbone()
    x, mask, _, _ = _inputs(backbone)
    samples = backbone.decode(x, mask)
    path = backbone.save_samples(samples, tmp_path, ["a box", "a box", "a cone"])
    backbone.save_samples(samples, tmp_path, ["a cone"] * 3, start_index=3)
    plys = sorted((tmp_path / "shapes").glob("*.ply"))
    assert [p.name for p in plys] == [f"{i:05d}.ply" for i in range(6)]
    cloud = trimesh.load(plys[2])
    assert len(cloud.vertices) == int(mask[2].sum())
    from PIL import Image

    assert path.name == "samples.png" and Image.open(path).size[1] > 2 * 64  # two prompt rows of tiles


def test_a_model_from_a_local_folder(tmp_path):
    """The path for point-cloud models brought from elsewhere: config.json + model.safetensors."""
    a = tiny_shape_backbone(max_points=20, min_points=10, color_channels=3, prediction_type="epsilon")
    folder = a.save_pretrained(tmp_path / "my_model")
    b = ShapeBackbone(pretrained=str(folder))
    assert (b.max_points, b.color_channels, b.prediction_type, b.width) == (20, 3, "epsilon", a.width)
    same = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in same)
    check_backbone(b, PROMPTS, DDIMKernel(1.0))
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ShapeBackbone(pretrained=str(folder))
