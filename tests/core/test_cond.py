"""`Cond`: tensors and per-sample metadata under one batch size, through every batch operation; `Batch`."""

from __future__ import annotations

import pytest
import torch

from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import ToyBackbone
from diffalign.core.types import Batch, Cond

PROMPTS = ["a 3", {"digit": 3, "direction": "left"}, "a 7", {"digit": 1}]


def make_cond() -> Cond:
    return Cond({"label": torch.arange(4), "emb": torch.randn(4, 2, 3), "prompt": list(PROMPTS)})


def test_entries_rows_and_validation():
    c = make_cond()
    assert len(c) == 4 and c.batch_size == 4 and set(c) == {"label", "emb", "prompt"}
    assert c.prompts == PROMPTS and set(c.tensors) == {"label", "emb"} and set(c.metadata) == {"prompt"}
    rows = c[torch.tensor([3, 1])]
    assert rows["label"].tolist() == [3, 1] and rows["prompt"] == [PROMPTS[3], PROMPTS[1]]
    assert c[1:3]["prompt"] == PROMPTS[1:3] and len(c[torch.tensor([True, False, True, False])]) == 2
    with pytest.raises(ValueError, match="'prompt' has 3"):
        Cond({"label": torch.arange(4), "prompt": PROMPTS[:3]})
    with pytest.raises(ValueError, match="explicit batch_size"):
        Cond({})
    assert len(Cond.empty(5)) == 5


def test_cat_repeat_to_detach_keep_metadata_aligned():
    c = make_cond()
    both = Cond.cat([c, c[:2]])
    assert len(both) == 6 and both["prompt"] == PROMPTS + PROMPTS[:2]
    assert torch.equal(both["label"], torch.tensor([0, 1, 2, 3, 0, 1]))
    rep = c.repeat_interleave(2)
    assert rep["prompt"] == [p for p in PROMPTS for _ in range(2)]
    assert torch.equal(rep["emb"][2], c["emb"][1]) and torch.equal(rep["emb"][3], c["emb"][1])
    moved = c.to(torch.float64)
    assert moved["emb"].dtype == torch.float64 and moved["label"].dtype == torch.long
    assert moved["prompt"] == PROMPTS
    w = torch.ones(1, requires_grad=True)
    assert not c.replace(emb=c["emb"] * w).detach()["emb"].requires_grad
    with pytest.raises(ValueError, match="different keys"):
        Cond.cat([c, c.drop("prompt")])


def test_where_and_replace_build_a_null_form_over_every_entry():
    c = make_cond()
    null = c.replace(label=torch.full((4,), 9))
    assert null["prompt"] == PROMPTS  # metadata the null form does not name is kept
    mixed = c.where(torch.tensor([True, False, True, False]), null)
    assert mixed["label"].tolist() == [9, 1, 9, 3] and mixed["prompt"] == PROMPTS
    with pytest.raises(ValueError, match="every entry must have 4 rows"):
        c.replace(label=torch.zeros(3))


def test_guidance_concatenates_cond_and_null_over_every_entry():
    """CFG runs conditional and unconditional rows in one call; the denoiser sees both halves with the
    metadata intact and the null tensors in the second half."""
    seen = []

    class Recording(ToyBackbone):
        def denoise(self, x_t, t, cond, mask=None):
            seen.append(cond)
            return super().denoise(x_t, t, cond, mask)

    policy = DiffusionPolicy(Recording(hidden=8, depth=1), num_steps=1, guidance_scale=3.0)
    cond = policy.backbone.condition({"prompt": [0, 2]})
    policy.rollout(cond, torch.Generator().manual_seed(0))
    (both,) = seen
    assert len(both) == 4 and both["prompt"] == [0, 2, 0, 2]
    assert both["label"].tolist() == [0, 2, 4, 4]  # class 4 is the toy's null condition


def test_structured_conditions_reach_rewards_through_the_trajectory():
    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2)
    cond = policy.backbone.condition({"prompt": [1, 3]})
    traj = policy.rollout(cond, torch.Generator().manual_seed(0))
    assert traj.cond["prompt"] == [1, 3] and traj[1:].cond["prompt"] == [3]


def test_batch_container_indexes_rows_and_passes_values_through():
    g = torch.Generator()
    b = Batch(x=torch.randn(4, 2), step=torch.arange(4), cond=make_cond(), generator=g, scale=2.0, mask=None)
    sub = b[torch.tensor([2, 0])]
    assert len(sub) == 2 and sub.step.tolist() == [2, 0] and sub.cond["prompt"] == [PROMPTS[2], PROMPTS[0]]
    assert sub.generator is g and sub.scale == 2.0 and sub.mask is None
    both = Batch.cat([b, sub])
    assert len(both) == 6 and both.cond["prompt"][4:] == [PROMPTS[2], PROMPTS[0]]
    with pytest.raises(AttributeError, match="has no field 'nope'"):
        _ = b.nope
    with pytest.raises(ValueError, match="rows"):
        Batch(x=torch.randn(4, 2), y=torch.randn(3))


def test_toy_backbone_reads_the_condition_from_prompt_only():
    """Preference batches carry `label` (the preference strength): it must never be read as the
    condition (the toy DPO/KTO bug of an earlier version)."""
    bb = ToyBackbone(hidden=8, depth=1)
    cond = bb.condition({"prompt": [0, 1, 2, 3], "label": torch.tensor([1.0, 1.0, 0.5, 1.0])})
    assert cond["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="'prompt'"):
        bb.condition({"label": [1, 2]})
