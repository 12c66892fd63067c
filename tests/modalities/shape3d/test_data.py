"""Conditions, generated primitives, captions and the pretraining data module."""

import pytest
import torch

from diffalign.modalities.shape3d.conditioning import (
    ShapeCondition,
    condition_ids,
    parse_condition,
    prompt_text,
    prompted_shapes,
)
from diffalign.modalities.shape3d.data import ShapesDataModule, captions, make_dataset, reference_set
from diffalign.modalities.shape3d.primitives import ShapeSpec, make_shape


def test_prompts_dicts_and_ids_parse_to_attributes():
    assert parse_condition("A Small TALL ball") == ShapeCondition("sphere", "tall", "small")
    assert parse_condition("a cat") == ShapeCondition()
    assert parse_condition(2) == ShapeCondition("cylinder")
    assert parse_condition({"shape": "donut", "size": 1, "num_points": 70}) == ShapeCondition(
        "torus", size="large", num_points=70
    )
    assert parse_condition({"prompt": "a flat box", "aspect": None}) == ShapeCondition("box")
    assert prompt_text("cone", "tall", "small") == "a small tall cone"
    ids = condition_ids(["a tall cone", "a red box", 5])
    assert ids["shape"].tolist() == [4, 1, 6] and ids["aspect"].tolist() == [2, 0, 0]
    assert ids["color"].tolist() == [0, 1, 0]
    for bad, err in (
        ({"shape": "star"}, ValueError),
        ({"colour": "red"}, ValueError),
        (9, ValueError),
        (1.5, TypeError),
    ):
        with pytest.raises(err):
            parse_condition(bad)
    assert prompted_shapes(["a cone", 0], 2).tolist() == [3, 0]
    with pytest.raises(ValueError, match="name a shape"):
        prompted_shapes(["a tall thing"], 1)


def test_primitives_have_their_size_aspect_and_are_centred():
    import numpy as np

    rng = np.random.default_rng(0)
    tall, _ = make_shape(ShapeSpec("cylinder", "tall"), 400, rng)
    flat, _ = make_shape(ShapeSpec("cylinder", "flat"), 400, rng)
    h = lambda p: p[:, 2].max() - p[:, 2].min()  # noqa: E731
    w = lambda p: p[:, 0].max() - p[:, 0].min()  # noqa: E731
    assert abs(h(tall) / w(tall) - 2 * 1.0 / 0.9) < 0.15  # aspect 2 on a cylinder of height/diameter 1/0.9
    assert abs(h(flat) / w(flat) - 0.5 / 0.9) < 0.1
    assert np.abs(tall.mean(0)).max() < 1e-5
    sphere, colors = make_shape(ShapeSpec("sphere", color="red"), 200, rng)
    assert colors.shape == (200, 3) and colors[:, 0].mean() > 0.7


def test_datasets_are_deterministic_padded_and_varied():
    a, b = (
        make_dataset(40, seed=7, min_points=20, max_points=30),
        make_dataset(40, seed=7, min_points=20, max_points=30),
    )
    assert a is b  # cached per process
    counts = a.mask.sum(1)
    assert counts.min() >= 20 and counts.max() <= 30 and len(set(counts.tolist())) > 3
    assert torch.equal(a.points[a.mask == 0], torch.zeros_like(a.points[a.mask == 0]))
    assert len({s.shape for s in a.specs}) == 6 and any(s.tilted for s in a.specs)
    ref = reference_set("a tall cone", 5, min_points=20, max_points=30)
    assert {s.shape for s in ref.specs} == {"cone"}


def test_captions_follow_noise_and_attribute_rates():
    specs = make_dataset(300, seed=3, min_points=8, max_points=8).specs
    clean = captions(specs, 0, caption_noise=0.0)
    assert all(parse_condition(c).shape == s.shape for c, s in zip(clean, specs, strict=True))
    noisy = captions(specs, 0, caption_noise=0.5)
    wrong = sum(parse_condition(c).shape != s.shape for c, s in zip(noisy, specs, strict=True)) / len(specs)
    assert 0.3 < wrong < 0.5  # half are replaced by a random shape, 1 in 6 of those by the true one
    never = captions(specs, 0, attribute_rate=0.0)
    assert all(parse_condition(c).aspect is None and parse_condition(c).size is None for c in never)


def test_data_module_batches_the_sample_layout():
    dm = ShapesDataModule(num_shapes=20, min_points=10, max_points=16, batch_size=4, batches_per_epoch=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["sample"]["points"].shape == (4, 16, 3) and batch["sample"]["mask"].shape == (4, 16)
    assert len(batch["prompt"]) == 4 and all(parse_condition(p).shape for p in batch["prompt"])
    assert len(dm.evaluation_set()) == 6 * dm.eval_seeds_per_prompt
