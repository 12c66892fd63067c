"""Video rewards on the clip layout (B, F, 3, H, W): analytic values, frame selection, gradients, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.core.reward import SampleView
from diffalign.modalities.video import MotionCondition, load_digits_8x8
from diffalign.modalities.video.data import make_clip, render_clip
from diffalign.modalities.video.testing import tiny_video_backbone
from diffalign.rewards.video import (
    FrameDigitFidelity,
    FrameImageReward,
    MotionAgreement,
    SubjectConsistency,
    TemporalFlicker,
    centred_windows,
    ink_centres,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_8x8("test")


def rgb(frames):
    """(B, F, H, W) gray → the clip layout (B, F, 3, H, W)."""
    return frames[:, :, None].expand(-1, -1, 3, -1, -1)


def clip_of(images, labels, digit, condition, start):
    k = int((labels == digit).nonzero()[0])
    return make_clip(images[k], condition, torch.tensor(start))[:, 0]  # (F, H, W)


# -- frame digit fidelity -------------------------------------------------------------------------
def test_centred_window_is_the_classifier_upsampling_of_a_centred_digit(digits):
    images, _ = digits
    frame = torch.zeros(16, 16)
    frame[4:12, 3:11] = images[5]  # box at rows 4..11, columns 3..10: its centre is (7.5, 6.5)
    window = centred_windows(frame[None], torch.tensor([[7.5, 6.5]]))[0, 0]
    expected = F.interpolate(images[5][None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(
        window[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-6
    )  # the border ring pads differently


def test_fidelity_is_translation_invariant_and_follows_the_prompt(digits):
    images, labels = digits
    frames = torch.stack(
        [clip_of(images, labels, d, MotionCondition(d, "right", "slow"), [8.0, 6.0]) for d in range(10)]
    )
    reward = FrameDigitFidelity(frames="all")
    right = reward(rgb(frames), {"prompt": [f"a {d} moving right, slow" for d in range(10)]})
    wrong = reward(rgb(frames), {"prompt": [f"a {(d + 1) % 10}" for d in range(10)]})
    assert right.elements.shape == (10, 8)
    assert right.scores.mean() > 0.7 and wrong.scores.mean() < 0.2
    # integer moves (frames 0..3 move by one pixel each) leave the centred window, hence the score, unchanged
    assert torch.allclose(right.elements[:, 0], right.elements[:, 3], atol=1e-5)


def test_fidelity_frame_selection_and_aggregation_through_the_backbone(digits):
    images, labels = digits
    frames = torch.stack([clip_of(images, labels, 3, MotionCondition(3, "up", "fast"), [9.0, 8.0])])[:, :4]
    frames = frames.repeat(2, 1, 1, 1)[:, :, 4:12, 4:12].contiguous()  # 4 frames of 8×8 for the tiny backbone
    frames[1, 1:] = 0  # clip 1: only its first frame shows the digit
    backbone = tiny_video_backbone()
    x0, _ = backbone.encode(rgb(frames))
    cond = {"prompt": ["a 3 moving up, fast", {"digit": 3, "direction": "up", "speed": "fast"}]}
    view = SampleView(backbone, x0, generator=torch.Generator().manual_seed(0))
    every = FrameDigitFidelity(frames="all", aggregate="min").evaluate(view, backbone.condition(cond))
    fml = FrameDigitFidelity(frames="first_middle_last").evaluate(view, backbone.condition(cond))
    alt = FrameDigitFidelity(frames=2).evaluate(view, backbone.condition(cond))
    one = FrameDigitFidelity(frames="random").evaluate(view, backbone.condition(cond))
    assert every.elements.shape == (2, 4) and fml.elements.shape == (2, 3) and alt.elements.shape == (2, 2)
    assert one.elements.shape == (2, 1)
    assert torch.allclose(every.scores, every.elements.min(1).values)
    assert torch.allclose(fml.scores, every.elements[:, [0, 2, 3]].mean(1), atol=1e-6)
    assert torch.allclose(alt.scores, every.elements[:, [0, 2]].mean(1), atol=1e-6)
    assert every.scores[1] < every.scores[0]  # the worst frame of clip 1 is blank


def test_fidelity_is_differentiable_and_checks_its_input():
    reward = FrameDigitFidelity()
    clips = torch.rand(2, 3, 3, 16, 16, requires_grad=True)
    reward(clips, {"prompt": ["a 1", "a 2"]}).scores.sum().backward()
    assert clips.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="name a digit"):
        reward(clips.detach(), {"prompt": ["a 1", "moving left"]})
    with pytest.raises(ValueError, match="expects clips"):
        reward(torch.rand(2, 3, 16, 16), {"prompt": ["a 1", "a 2"]})
    with pytest.raises(ValueError, match="aggregate"):
        FrameDigitFidelity(aggregate="median")


# -- flicker and subject consistency --------------------------------------------------------------
def test_flicker_values():
    static = torch.rand(1, 1, 6, 6).expand(1, 5, 6, 6)
    assert TemporalFlicker()(rgb(static), None).scores.item() == pytest.approx(1.0)
    blink = torch.zeros(1, 4, 6, 6)
    blink[:, 1::2] = 1.0
    assert TemporalFlicker()(rgb(blink), None).scores.item() == pytest.approx(0.0)
    clip = torch.zeros(1, 3, 4, 4)
    clip[0, 1:, 0, :] = 0.5  # frame 1 changes 4 of 16 pixels by 0.5; frame 2 equals frame 1
    out = TemporalFlicker()(rgb(clip).clone().requires_grad_(), None)
    assert out.scores.item() == pytest.approx(1 - (4 * 0.5 / 16 + 0) / 2)
    assert "motion_px" in out.info


def test_flicker_reports_motion_of_moving_digits(digits):
    images, labels = digits
    moving = clip_of(images, labels, 4, MotionCondition(4, "left", "fast"), [8.0, 10.0])[None]
    static = moving[:, :1].expand(1, 8, 16, 16)
    m = TemporalFlicker()(rgb(torch.cat([moving, static])), None)
    assert m.scores[1] == pytest.approx(1.0) and m.scores[0] < 1
    assert m.info["motion_px"][0] > 1.0 and m.info["motion_px"][1] == pytest.approx(0.0)


def test_subject_consistency_values(digits):
    images, labels = digits
    reward = SubjectConsistency()
    moving = clip_of(images, labels, 2, MotionCondition(2, "down", "slow"), [6.0, 8.0])  # integer moves
    static = moving[:1].expand(8, 16, 16)
    assert reward(rgb(static[None]), None).scores.item() == pytest.approx(1.0, abs=1e-5)
    assert reward(rgb(moving[None]), None).scores.item() == pytest.approx(1.0, abs=1e-4)  # moved, not changed
    # frames 0-3 show a 2, frames 4-7 a 7: the score is the VBench formula over the features
    other = clip_of(images, labels, 7, MotionCondition(7, "down", "slow"), [6.0, 8.0])
    mixed = torch.cat([moving[:4], other[4:]])[None]
    f = reward.features(mixed[0])
    cos = torch.nn.functional.cosine_similarity
    expected = sum(0.5 * (cos(f[t], f[0], dim=0) + cos(f[t], f[t - 1], dim=0)) for t in range(1, 8)) / 7
    got = reward(rgb(mixed), None).scores.item()
    assert got == pytest.approx(expected.item(), abs=1e-5) and got < 0.95


# -- motion agreement -----------------------------------------------------------------------------
def test_motion_agreement_is_one_on_true_clips(digits):
    images, labels = digits
    conditions = [
        MotionCondition(d, r, s) for d, r, s in [(0, "left", "fast"), (5, "up", "slow"), (8, "right", "fast")]
    ]
    starts = [[8.0, 9.7], [10.3, 6.1], [6.6, 6.0]]
    clips = torch.stack(
        [clip_of(images, labels, c.digit, c, s) for c, s in zip(conditions, starts, strict=True)]
    )
    out = MotionAgreement(floor=0.0)(rgb(clips), {"prompt": [c.text() for c in conditions]})
    assert torch.allclose(out.scores, torch.ones(3), atol=1e-4)
    assert out.info["com_error_px"].max() < 1e-3


def test_motion_agreement_of_a_wrong_direction_is_the_hand_computed_value(digits):
    images, labels = digits
    # right, slow from column 6: 6 7 8 9 10 11 10 9; the prompt says left, slow: 6 5 6 7 8 9 10 11
    clip = clip_of(images, labels, 1, MotionCondition(1, "right", "slow"), [8.0, 6.0])[None]
    out = MotionAgreement(sigma=1.0, floor=0.0)(rgb(clip), {"prompt": ["a 1 moving left, slow"]})
    errors = [2, 2, 2, 2, 2, 0, 2]
    expected = sum(math.exp(-(e**2) / 2) for e in errors) / 7
    assert out.scores.item() == pytest.approx(expected, abs=1e-3)
    assert out.info["motion_px"].item() == pytest.approx(1.0, abs=1e-3)


def test_motion_agreement_gradient_and_errors():
    reward = MotionAgreement()
    clips = torch.rand(2, 4, 3, 16, 16, requires_grad=True)
    reward(
        clips, {"prompt": ["a 1 moving up, fast", {"digit": 2, "direction": "left", "speed": "slow"}]}
    ).scores.sum().backward()
    assert clips.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="direction and a speed"):
        reward(clips.detach(), {"prompt": ["a 1 moving up", "a 2 moving left, slow"]})
    with pytest.raises(ValueError, match="sigma"):
        MotionAgreement(sigma=0)


def test_ink_centres_ignore_faint_background():
    frames = torch.full((1, 16, 16), 0.1)  # faint noise everywhere
    frames[0, 2:4, 12:14] = 1.0
    assert ink_centres(frames)[0].tolist() == pytest.approx([2.5, 12.5])
    assert ink_centres(torch.zeros(1, 16, 16))[0].tolist() == [7.5, 7.5]  # no ink: the frame centre
    shifted = render_clip(torch.ones(2, 2), torch.tensor([[3.25, 9.75]]))[0]
    assert ink_centres(shifted, floor=0.0)[0].tolist() == pytest.approx([3.25, 9.75], abs=1e-5)


# -- image rewards on frames ----------------------------------------------------------------------
def test_frame_image_reward_scores_each_selected_frame_with_its_clips_condition():
    from diffalign.core.reward import FunctionReward

    backbone = tiny_video_backbone()
    clips = torch.rand(3, 4, 3, 8, 8)
    clips[1] *= 0.2  # a darker clip
    x0, _ = backbone.encode(clips)
    cond = backbone.condition({"prompt": ["a 1", "a 2", "a 3"]})
    brightness = FunctionReward("tests.rewards.test_video_rewards.mean_brightness", differentiable=True)
    reward = FrameImageReward(brightness, frames="first_middle_last", aggregate="min")
    out = reward.evaluate(SampleView(backbone, x0), cond)
    decoded = backbone.decode(x0)[:, [0, 2, 3]]
    assert torch.allclose(out.elements, decoded.mean(dim=(2, 3, 4)), atol=1e-6)
    assert torch.allclose(out.scores, out.elements.min(1).values) and out.scores.argmin() == 1
    assert reward.differentiable and reward.name == "mean_brightness_frames"
    one = FrameImageReward(brightness).evaluate(SampleView(backbone, x0), cond)  # one random frame
    assert one.elements.shape == (3, 1)


def mean_brightness(images, cond):
    assert (
        images.dim() == 4 and len(cond["prompt"]) == images.shape[0]
    )  # one image per frame, with its prompt
    return images.mean(dim=(1, 2, 3))


# -- the motion classifier ------------------------------------------------------------------------
def test_shipped_motion_classifier_reads_direction_and_speed_of_heldout_clips():
    import json
    from pathlib import Path

    from diffalign.modalities.video.data import MovingDigits
    from diffalign.modalities.video.train_motion_classifier import labelled_clips
    from diffalign.rewards.video import MotionClassifierReward

    images, labels = load_digits_8x8("test")
    clips, _ = labelled_clips(MovingDigits(images, labels, seed=2), 0, 64)
    truths = [MovingDigits(images, labels, seed=2)[i][2] for i in range(64)]
    reward = MotionClassifierReward()
    right = reward(rgb(clips[:, :, 0]), {"prompt": [t.text() for t in truths]})
    assert right.info["motion_accuracy"].mean() > 0.95 and right.scores.mean() > 0.9
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [MotionCondition(t.digit, flipped[t.direction], t.speed).text() for t in truths]
    assert reward(rgb(clips[:, :, 0]), {"prompt": wrong}).scores.mean() < 0.1
    report = json.loads((Path(__file__).parents[2] / "modalities/video/motion_classifier.json").read_text())
    assert report["heldout_accuracy"] > 0.95
    grad_clips = rgb(clips[:2, :, 0]).clone().requires_grad_()
    reward(grad_clips, {"prompt": [t.text() for t in truths[:2]]}).scores.sum().backward()
    assert grad_clips.grad.abs().sum() > 0
