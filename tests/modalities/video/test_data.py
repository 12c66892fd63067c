"""Moving digits: exact bouncing trajectories, seeded clips, the data module's batches."""

import torch

from diffalign.modalities.video import COM_WALLS, MotionCondition, MovingDigitsDataModule, load_digits_8x8
from diffalign.modalities.video.data import (
    EVAL_PROMPTS,
    MovingDigits,
    bouncing_trajectory,
    centre_of_mass,
    fold,
    make_clip,
    render_clip,
)


def test_fold_reflects_between_walls():
    p = torch.tensor([5.0, 4.0, 3.0, 12.0, 13.0, 20.0])
    assert fold(p, 4.5, 11.5).tolist() == [5.0, 5.0, 6.0, 11.0, 10.0, 6.0]


def test_bouncing_trajectory_matches_hand_computed_path():
    start, v = torch.tensor([6.0, 10.0]), torch.tensor([0.0, 2.0])  # right, fast
    path = bouncing_trajectory(start, v, 5, COM_WALLS)
    assert path[:, 0].tolist() == [6.0] * 5
    assert path[:, 1].tolist() == [
        10.0,
        10.0,
        8.0,
        6.0,
        6.0,
    ]  # 10 → 12 reflects off 11 to 10, ... 4 off 5 to 6


def test_rendered_frames_have_their_centre_of_mass_exactly_where_asked():
    images, _ = load_digits_8x8("test")
    centres = torch.tensor([[8.0, 8.0], [6.25, 9.5], [11.0, 5.0]])
    frames = render_clip(images[0], centres)
    assert frames.shape == (3, 1, 16, 16) and frames.min() >= 0 and frames.max() <= 1
    assert torch.allclose(centre_of_mass(frames[:, 0]), centres, atol=1e-4)
    total = images[0].sum()
    assert torch.allclose(frames.sum(dim=(1, 2, 3)), total.expand(3), atol=1e-4)  # ink is conserved


def test_clip_follows_its_condition():
    images, _ = load_digits_8x8("test")
    clip = make_clip(images[3], MotionCondition(0, "up", "slow"), torch.tensor([10.0, 7.0]))
    com = centre_of_mass(clip[:, 0])
    assert torch.allclose(com[:, 0], torch.tensor([10.0, 9, 8, 7, 6, 5, 6, 7]), atol=1e-4)  # bounces at 5
    assert torch.allclose(com[:, 1], torch.full((8,), 7.0), atol=1e-4)


def test_stream_is_seeded_and_starts_upstream():
    images, labels = load_digits_8x8("train")
    a, b = MovingDigits(images, labels, seed=3), MovingDigits(images, labels, seed=3)
    clip, caption, truth = a[17]
    assert torch.equal(clip, b[17][0]) and caption == truth
    assert not torch.equal(clip, MovingDigits(images, labels, seed=4)[17][0])
    lo, hi = COM_WALLS
    for i in range(40):  # every clip first heads the way its caption says
        clip, _, truth = a[i]
        com = centre_of_mass(clip[:2, 0])
        step = (com[1] - com[0]).tolist()
        vy, vx = truth.velocity
        assert abs(step[0] - vy) < 1e-4 and abs(step[1] - vx) < 1e-4, (i, truth, step)
        assert lo - 1e-4 <= com.min() and com.max() <= hi + 1e-4


def test_caption_noise_changes_some_captions_only():
    images, labels = load_digits_8x8("train")
    noisy = MovingDigits(images, labels, caption_noise=0.5, seed=0)
    rows = [noisy[i] for i in range(60)]
    wrong = sum(caption != truth for _, caption, truth in rows)
    assert 10 < wrong < 60


def test_data_module_batches_and_evaluation_set():
    dm = MovingDigitsDataModule(batch_size=3, batches_per_epoch=2, eval_seeds_per_prompt=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    batch = batches[0]
    assert batch["sample"].shape == (3, 8, 1, 16, 16) and len(batch["prompt"]) == 3
    assert batch["prompt"] == batch["truth"]
    assert len(dm.evaluation_set()) == 2 * len(EVAL_PROMPTS) == 32
    digits = {p.split()[1] for p in EVAL_PROMPTS}
    assert digits == {str(d) for d in range(10)}
