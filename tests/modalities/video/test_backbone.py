"""VideoBackbone: the core contract (ε and flow, LoRA), the clip layout, frame selection, errors."""

import pytest
import torch

from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.lora import LoRABackbone
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import SampleView
from diffalign.core.testing import check_backbone
from diffalign.modalities.video import VideoBackbone, frame_indices, from_clip_layout, to_clip_layout
from diffalign.modalities.video.testing import tiny_video_backbone

BATCH = {"prompt": ["a 3 moving left, fast", {"digit": 7, "direction": "up", "speed": "slow"}, 5]}


def test_epsilon_backbone_fits_the_core():
    check_backbone(tiny_video_backbone(), BATCH, DDIMKernel(eta=1.0))


def test_flow_backbone_fits_the_core():
    check_backbone(tiny_video_backbone(prediction_type="flow"), BATCH, FlowSDEKernel(noise_level=0.7))


def test_lora_backbone_fits_the_core_and_trains_adapters_only():
    lora = LoRABackbone(tiny_video_backbone(), rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    check_backbone(lora, BATCH)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(".unet." in n for n in names)  # lora_target() is the UNet, not the conditioner


def test_training_mode_has_no_dropout():
    """diffusers' temporal convolutions default to dropout 0.1: re-scored log-probs would not match."""
    backbone = tiny_video_backbone().train()
    cond = backbone.condition(BATCH)
    x, _ = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((3,), 500)
    assert torch.equal(backbone.denoise(x, t, cond), backbone.denoise(x, t, cond))


def test_condition_changes_the_output_and_null_condition():
    backbone = tiny_video_backbone()
    torch.nn.init.normal_(backbone.conditioner.tables[0].weight, std=1.0)
    cond = backbone.condition({"prompt": ["a 1 moving left, fast", "a 8 moving left, fast"]})
    x = torch.randn(1, 1, 4, 8, 8).expand(2, -1, -1, -1, -1)
    out = backbone.denoise(x, torch.full((2,), 300), cond)
    assert not torch.allclose(out[0], out[1])
    null = cond.replace(**backbone.null_condition(cond))
    assert torch.equal(null["motion_ids"][0], null["motion_ids"][1]) and null.prompts == cond.prompts


def test_decode_layout_and_round_trip():
    backbone = tiny_video_backbone()
    x = torch.rand(2, 1, 4, 8, 8) * 2 - 1
    clips = backbone.decode(x)
    assert clips.shape == (2, 4, 3, 8, 8) and clips.min() >= 0 and clips.max() <= 1
    assert torch.allclose(clips[:, 2, 0], (x[:, 0, 2] + 1) / 2)  # frame 2 of clip b is model frame 2
    assert torch.allclose(backbone.encode(clips)[0], x, atol=1e-6)
    assert torch.allclose(backbone.encode(clips[:, :, :1])[0], x, atol=1e-6)
    assert backbone.decode(torch.full((1, 1, 4, 8, 8), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match="F=4"):
        backbone.encode(torch.rand(2, 5, 1, 8, 8))
    with pytest.raises(ValueError, match="expected clips"):
        from_clip_layout(torch.rand(2, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="model-space"):
        to_clip_layout(torch.rand(2, 2, 4, 8, 8))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("first_middle_last", [0, 4, 7]),
        (2, [0, 2, 4, 6]),
        (3, [0, 3, 6]),
        ([1, -1], [1, 7]),
    ],
)
def test_frame_selection(spec, expected):
    idx = frame_indices(spec, 8, 2)
    assert idx.tolist() == [expected, expected]


def test_random_frame_uses_the_generator_and_decodes_one_frame_per_clip():
    backbone = tiny_video_backbone()
    x = torch.rand(16, 1, 4, 8, 8) * 2 - 1
    a = backbone.decode(x, frames="random", generator=torch.Generator().manual_seed(1))
    b = backbone.decode(x, frames="random", generator=torch.Generator().manual_seed(1))
    assert a.shape == (16, 1, 3, 8, 8) and torch.equal(a, b)
    idx = frame_indices("random", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(a[:, 0], backbone.decode(x)[torch.arange(16), idx[:, 0]])
    assert len(set(idx[:, 0].tolist())) > 1  # one draw per clip, not one for the batch


def test_frame_selection_errors_are_named():
    backbone = tiny_video_backbone()
    x = torch.zeros(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="frames"):
        backbone.decode(x, frames="every_other")
    with pytest.raises(ValueError, match="k >= 1"):
        backbone.decode(x, frames=0)
    with pytest.raises(ValueError, match="frame indices"):
        backbone.decode(x, frames=[0, 4])
    with pytest.raises(ValueError, match="'frames' only"):
        backbone.decode(x, window=3)


def test_sample_view_decodes_each_request_once_with_its_generator():
    backbone = tiny_video_backbone(decode_chunk_size=3)
    x = torch.rand(5, 1, 4, 8, 8) * 2 - 1
    view = SampleView(backbone, x, None, generator=torch.Generator().manual_seed(0))
    assert view.get({"frames": "random"}).shape == (5, 1, 3, 8, 8)
    assert view.get({"frames": 2}).shape == (5, 2, 3, 8, 8)
    assert view.get({}).shape == (5, 4, 3, 8, 8)
    assert view.get({"frames": "random"}) is view.get({"frames": "random"})


def test_reward_backprop_through_one_decoded_frame():
    backbone = tiny_video_backbone()
    x = (torch.rand(2, 1, 4, 8, 8) - 0.5).requires_grad_()
    backbone.decode(x, frames=[1]).sum().backward()
    assert x.grad[:, :, 1].abs().sum() > 0
    assert x.grad[:, :, [0, 2, 3]].abs().sum() == 0  # only the decoded frame gets a gradient


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        VideoBackbone(prediction_type="x0", weights=None)
    with pytest.raises(ValueError, match="block types"):
        VideoBackbone(block_out_channels=(8, 16), down_block_types=("DownBlock3D",), weights=None)
    with pytest.raises(KeyError, match="prompt"):
        tiny_video_backbone().condition({"text": ["x"]})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VideoBackbone(weights=str(tmp_path / "missing.safetensors"))


def test_policy_samples_clips_of_the_right_shape():
    backbone = tiny_video_backbone(prediction_type="flow")
    policy = DiffusionPolicy(backbone, FlowSDEKernel(0.7), num_steps=2, guidance_scale=2.0)
    traj = policy.rollout(backbone.condition(BATCH), torch.Generator().manual_seed(0))
    assert traj.x0.shape == (3, 1, 4, 8, 8) and traj.states.shape == (3, 3, 1, 4, 8, 8)
