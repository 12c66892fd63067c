"""Image rewards on known inputs: JPEG size, digit fidelity, brightness."""

import pytest
import torch

from diffalign.modalities.image import digit_prompt, load_digit_images
from diffalign.rewards.image import (
    Brightness,
    DigitFidelity,
    JpegCompressibility,
    JpegIncompressibility,
    TargetColor,
)


def _rgb(x):
    return x.repeat(1, 3, 1, 1)


def test_jpeg_flat_image_is_smaller_than_noise():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand((1, 3, 32, 32), generator=g)])
    comp = JpegCompressibility()(images, {})
    incomp = JpegIncompressibility()(images, {})
    assert comp.scores[0] > comp.scores[1]  # flat compresses better
    assert torch.equal(incomp.scores, -comp.scores)
    assert (comp.info["jpeg_kb"] > 0).all()
    assert not JpegCompressibility.differentiable
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        JpegCompressibility()(torch.rand(2, 16, 16), {})


def test_jpeg_matches_the_trl_peer_harness_definition():
    """benchmarks/sd_gpu.py compares with TRL on this reward: −(JPEG kB at quality 95), kB = 1000 bytes."""
    import io

    from PIL import Image

    images = torch.rand((2, 3, 24, 24), generator=torch.Generator().manual_seed(1))
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        expected.append(-buf.tell() / 1000.0)
    assert JpegCompressibility()(images, {}).scores.tolist() == pytest.approx(expected)


def test_target_color_is_minus_mean_squared_distance_and_differentiable():
    target = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    exact = target.expand(1, 3, 4, 4).clone()
    images = torch.cat([exact, torch.zeros(1, 3, 4, 4)]).requires_grad_(True)
    scores = TargetColor()(images, {}).scores
    assert scores[0].item() == pytest.approx(0.0) and scores[1].item() == pytest.approx(
        -(0.81 + 0.01 + 0.01) / 3
    )
    scores.sum().backward()
    assert images.grad[1, 0].mean() > 0 and images.grad[1, 1].mean() > 0  # pulled up towards 0.9 and 0.1
    assert TargetColor.differentiable
    with pytest.raises(ValueError, match="rgb"):
        TargetColor(rgb=[1.5, 0, 0])


@pytest.fixture(scope="module")
def heldout():
    x, y = load_digit_images(16, "test")
    return _rgb(x), y


def test_digit_fidelity_scores_real_digits(heldout):
    x, y = heldout
    reward = DigitFidelity()
    right = reward(x, {"prompt": [digit_prompt(int(d)) for d in y]}).scores
    wrong = reward(x, {"prompt": [digit_prompt(int(d + 1) % 10) for d in y]}).scores
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    assert (right > wrong).float().mean() > 0.97


def test_digit_fidelity_is_differentiable_and_validates(heldout):
    x, y = heldout
    reward = DigitFidelity()
    assert reward.differentiable
    images = x[:4].clone().requires_grad_()
    out = reward(images, {"prompt": [f"a handwritten {int(d)}" for d in y[:4]]})
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert "digit_accuracy" in out.info
    with pytest.raises(ValueError, match="needs the prompts"):
        reward(x[:2], {})
    with pytest.raises(ValueError, match="name a digit"):
        reward(x[:2], {"prompt": ["a cat", "a handwritten 1"]})
    # prompt dicts and digit ids name the digit too (structured conditions)
    as_dicts = reward(images.detach(), {"prompt": [{"digit": int(d)} for d in y[:4]]}).scores
    as_ids = reward(images.detach(), {"prompt": [int(d) for d in y[:4]]}).scores
    assert torch.equal(as_dicts, out.scores.detach()) and torch.equal(as_ids, out.scores.detach())
    logp = DigitFidelity(log_prob=True)(x[:4], {"prompt": [int(d) for d in y[:4]]}).scores
    assert torch.allclose(logp.exp(), out.scores.detach(), atol=1e-5)


def test_brightness_target_and_gradient():
    white, black = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    r = Brightness(target=1.0)
    assert r(white, {}).scores.item() == 0.0 and r(black, {}).scores.item() == -1.0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert Brightness(target=[1.0, 0.0, 0.0])(red, {}).scores.item() == 0.0
    x = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    r(x, {}).scores.sum().backward()
    assert (x.grad > 0).all()  # brighter is better
    with pytest.raises(ValueError, match="one per RGB"):
        Brightness(target=[0.1, 0.2])


def test_digit_realism_is_high_for_real_digits_of_the_prompt_and_low_for_blobs():
    from diffalign.rewards.image import DigitRealism

    gold = DigitRealism()
    train_x, train_y = load_digit_images(16, split="train")
    idx = torch.arange(0, 200, 5)
    real = _rgb(train_x[idx])  # real digits the reference set has never seen (it is the held-out split)
    right = gold(real, {"prompt": [digit_prompt(int(d)) for d in train_y[idx]]}).scores
    wrong = gold(real, {"prompt": [digit_prompt((int(d) + 5) % 10) for d in train_y[idx]]}).scores
    blob = torch.zeros(len(idx), 3, 16, 16)
    blob[:, :, 3:13, 4:12] = 1.0  # a bright rectangle: what a collapsed policy draws
    blobs = gold(blob, {"prompt": [digit_prompt(int(d)) for d in train_y[idx]]}).scores
    assert right.mean() > 0.4 and right.mean() > 2 * wrong.mean() and right.mean() > 4 * blobs.mean()
    assert ((right >= 0) & (right <= 1)).all() and not DigitRealism.differentiable
    # a real held-out digit is its own nearest neighbour: score 1
    test_x, test_y = load_digit_images(16, split="test")
    own = gold(_rgb(test_x[:4]), {"prompt": [digit_prompt(int(d)) for d in test_y[:4]]}).scores
    torch.testing.assert_close(own, torch.ones(4))


def test_digit_features_separate_digits_and_collapse_copies():
    from diffalign.core.guards import prompt_diversity
    from diffalign.modalities.image.features import digit_features

    x, y = load_digit_images(16, split="test")
    f = digit_features(_rgb(x[:60]))
    assert f.shape == (60, 64) and (f >= 0).all()  # ReLU activations
    same = digit_features(_rgb(x[:1].repeat(6, 1, 1, 1)))
    keys = [str(int(d)) for d in y[:60]]
    real = prompt_diversity(f, keys)["diversity"]
    copies = prompt_diversity(same, ["a"] * 6)["diversity"]
    assert real > 1.0 and copies == pytest.approx(0.0, abs=1e-5)
