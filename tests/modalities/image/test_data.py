"""The digits data: layout, seeded held-out split, the pretraining data module."""

import torch

from diffalign.modalities.image import DIGIT_PROMPTS, DigitsDataModule, load_digit_images


def test_images_layout_and_split():
    x, y = load_digit_images(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    xtr, ytr = load_digit_images(16, "train")
    xte, yte = load_digit_images(16, "test")
    assert len(ytr) + len(yte) == 1797 and len(yte) == 359
    assert set(yte.tolist()) == set(range(10))
    # disjoint: no held-out image equals a training image
    flat_tr = {tuple(v.tolist()) for v in (xtr.reshape(len(xtr), -1) * 1000).round().int()}
    assert not any(tuple(v.tolist()) in flat_tr for v in (xte[:50].reshape(50, -1) * 1000).round().int())
    assert torch.equal(load_digit_images(16, "test")[0], xte)  # seeded
    assert load_digit_images(8)[0].shape[-1] == 8


def test_data_module_batches_and_evaluation_set():
    dm = DigitsDataModule(batch_size=8, batches_per_epoch=2, eval_seeds_per_prompt=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    b = batches[0]
    assert b["sample"].shape == (8, 1, 16, 16) and len(b["prompt"]) == 8
    assert all(p.startswith("a handwritten ") for p in b["prompt"])
    pairs = dm.evaluation_set()
    assert len(pairs) == 30 and sorted({p for p, _ in pairs}) == sorted(DIGIT_PROMPTS)
    assert len({s for _, s in pairs}) == 30
