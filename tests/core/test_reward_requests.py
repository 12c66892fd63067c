"""Rewards that see what they need: decode requests, chunked decoding, per-element scores, exact shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.reward import (
    GuardedReward,
    Reward,
    RewardError,
    RewardOutput,
    RewardShapeError,
    SampleView,
    WeightedSum,
    reward_metrics,
)
from diffalign.core.types import Cond


class Clips(Backbone):
    """A fake video backbone: model space (B, F, D); `decode(frames=...)` keeps some frames and records
    every call, so tests see what was decoded and how often."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, object]] = []

    def make_scheduler(self):
        return standard_scheduler("epsilon")

    def encode_condition(self, batch):
        return {}

    def null_condition(self, cond):
        return {}

    def init_noise(self, cond, generator=None):
        raise NotImplementedError

    def denoise(self, x_t, t, cond, mask=None):
        raise NotImplementedError

    def decode(self, x0, mask=None, frames="all", generator=None):
        self.calls.append((x0.shape[0], frames))
        if frames == "all":
            return x0
        if frames == "first":
            return x0[:, :1]
        if frames == "random":
            i = int(torch.randint(0, x0.shape[1], (1,), generator=generator))
            return x0[:, i : i + 1]
        raise ValueError(f"unknown frames {frames!r}")


class FrameMean(Reward):
    """Per-frame scores (B, F): the mean of each frame, reduced by `reduction`."""

    def __init__(self, frames: str = "all", reduction: str = "mean") -> None:
        super().__init__(f"frame_mean_{frames}", request={"frames": frames})
        self.reduction = reduction

    def forward(self, samples, cond):
        return RewardOutput(scores=samples.mean(-1), info={"first": samples[:, 0].mean(-1)})


def _view(b: int = 6, chunk: int | None = None) -> tuple[Clips, SampleView]:
    bb = Clips()
    bb.decode_chunk_size = chunk
    x0 = torch.arange(b * 4 * 2, dtype=torch.float32).reshape(b, 4, 2)
    return bb, SampleView(bb, x0, generator=torch.Generator().manual_seed(0))


def test_a_reward_gets_what_it_requests_and_per_element_scores_reduce():
    bb, view = _view()
    out = FrameMean("all", "min").evaluate(view, Cond.empty(6))
    x0 = view.x0
    assert out.elements.shape == (6, 4)
    torch.testing.assert_close(out.scores, x0.mean(-1).min(1).values)
    first = FrameMean("first", "mean").evaluate(view, Cond.empty(6))
    assert first.elements.shape == (6, 1) and bb.calls == [(6, "all"), (6, "first")]


def test_weighted_sum_decodes_once_per_distinct_request_and_reports_every_term():
    bb, view = _view()
    combo = WeightedSum([FrameMean("first"), FrameMean("all"), FrameMean("all", "max")], [1.0, 2.0, 0.5])
    out = combo.evaluate(view, Cond.empty(6))
    assert sorted(f for _, f in bb.calls) == ["all", "first"]  # "all" decoded once for both terms
    a = FrameMean("first").evaluate(view, Cond.empty(6)).scores
    b = FrameMean("all").evaluate(view, Cond.empty(6)).scores
    c = FrameMean("all", "max").evaluate(view, Cond.empty(6)).scores
    torch.testing.assert_close(out.scores, a + 2 * b + 0.5 * c)
    assert {k for k in out.info if k.startswith("term/")} == {
        "term/frame_mean_first",
        "term/frame_mean_all_1",
        "term/frame_mean_all_2",
    }
    assert "frame_mean_first/elements" in out.info


def test_decoding_runs_in_chunks_with_the_same_result():
    bb, view = _view(b=7, chunk=3)
    out = FrameMean().evaluate(view, Cond.empty(7))
    assert [n for n, _ in bb.calls] == [3, 3, 1]
    _, whole = _view(b=7)
    torch.testing.assert_close(out.scores, FrameMean().evaluate(whole, Cond.empty(7)).scores)


def test_random_requests_draw_from_the_views_generator():
    picks = []
    for _ in range(2):
        bb, view = _view()
        picks.append(FrameMean("random").evaluate(view, Cond.empty(6)).scores)
    torch.testing.assert_close(picks[0], picks[1])


def test_gradients_flow_through_a_requested_decode():
    bb = Clips()
    x0 = torch.randn(3, 4, 2, requires_grad=True)
    FrameMean("first").evaluate(SampleView(bb, x0), Cond.empty(3)).scores.sum().backward()
    assert x0.grad[:, 1:].abs().sum() == 0 and x0.grad[:, 0].abs().sum() > 0


def test_per_element_metrics_are_logged_per_element():
    bb, view = _view()
    scored = GuardedReward(FrameMean())(view, Cond.empty(6))
    m = reward_metrics(scored)
    assert {"reward/element_0", "reward/element_3", "reward/first"} <= set(m)
    assert m["reward/element_1"] == pytest.approx(float(view.x0[:, 1].mean()))


class Returns(Reward):
    def __init__(self, fn, reduction=None):
        super().__init__("returns")
        self.fn, self.reduction = fn, reduction

    def forward(self, samples, cond):
        return self.fn(samples)


@pytest.mark.parametrize("policy", ["raise", "drop"])
@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x: torch.zeros(x.shape[0] // 2, 2), r"\(3, 2\)"),  # would silently land on wrong samples
        (lambda x: np.zeros((x.shape[0], 2)), r"\(6, 2\)"),  # a numpy (B, 2) array
        (lambda x: torch.zeros(x.shape[0], 1), r"\(6, 1\)"),
        (lambda x: torch.zeros(x.shape[0] + 1), r"\(7,\)"),
    ],
)
def test_wrong_shapes_are_shape_errors_under_either_policy(fn, shape, policy):
    _, view = _view()
    with pytest.raises(RewardShapeError, match=rf"reward 'returns' returned scores of shape {shape} for 6"):
        GuardedReward(Returns(fn), on_invalid=policy)(view, Cond.empty(6))


def test_numpy_and_list_scores_of_the_right_shape_are_fine():
    _, view = _view()
    assert GuardedReward(Returns(lambda x: np.arange(6.0)))(view, Cond.empty(6)).scores.tolist() == list(
        np.arange(6.0)
    )
    assert GuardedReward(Returns(lambda x: [1.0] * 6))(view, Cond.empty(6)).scores.tolist() == [1.0] * 6


def test_a_non_finite_element_is_an_invalid_sample():
    def elements(x):
        e = torch.ones(x.shape[0], 3)
        e[2, 1] = float("nan")
        return e

    _, view = _view()
    with pytest.raises(RewardError, match="sample index 2"):
        GuardedReward(Returns(elements, reduction="max"))(view, Cond.empty(6))
    out = GuardedReward(Returns(elements, reduction="max"), "drop")(view, Cond.empty(6))
    assert out.keep.tolist() == [True, True, False, True, True, True]
