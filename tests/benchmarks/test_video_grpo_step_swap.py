"""benchmarks/video_grpo_step_swap.py: the aligned network runs exactly the steps a variant names."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.benchmarks.test_video_alignment import load_script


def test_step_sets_parse_and_refuse_steps_past_the_schedule() -> None:
    swap = load_script("video_grpo_step_swap")
    assert swap.parse_steps("all", 4) == {0, 1, 2, 3} and swap.parse_steps("none", 4) == set()
    assert swap.parse_steps("2", 4) == {2} and swap.parse_steps("1-3", 4) == {1, 2, 3}
    with pytest.raises(ValueError, match="steps 0-3"):
        swap.parse_steps("2-4", 4)


def test_swapped_policy_uses_the_aligned_output_only_at_its_steps() -> None:
    from diffalign.core.kernels import FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.video.testing import tiny_video_backbone

    swap = load_script("video_grpo_step_swap")
    torch.manual_seed(0)
    base = DiffusionPolicy(
        tiny_video_backbone(prediction_type="flow"), FlowSDEKernel(noise_level=0.7), num_steps=3
    )
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = base.backbone.condition({"prompt": ["a 1 moving left, fast", "a 2 moving up, slow"]})

    def x0(policy):
        with torch.no_grad():
            return policy.rollout(cond, [torch.Generator().manual_seed(s) for s in (1, 2)]).x0

    assert torch.equal(x0(swap.swapped(aligned, base, frozenset({0, 1, 2}))), x0(aligned))
    assert torch.equal(x0(swap.swapped(aligned, base, frozenset())), x0(base))
    first = x0(swap.swapped(aligned, base, frozenset({0})))
    assert not torch.allclose(first, x0(base)) and not torch.allclose(first, x0(aligned))
