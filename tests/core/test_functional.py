"""Rank-agnostic helpers: left_broadcast, per-sample randn, masked reductions and the Gaussian log-prob."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from diffalign.core.functional import (
    expand_mask,
    gaussian_log_prob,
    left_broadcast,
    masked_mse,
    randn,
    reduce_event,
)

SHAPES = [(3,), (3, 2), (3, 4, 5), (3, 2, 4, 5), (3, 2, 2, 4, 5)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# left_broadcast
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_left_broadcast_per_sample_over_ranks(shape):
    value = torch.tensor([1.0, 2.0, 3.0])
    b = left_broadcast(value, shape)
    assert b.shape == (3,) + (1,) * (len(shape) - 1)
    x = torch.ones(shape)
    prod = b * x
    assert prod.shape == x.shape
    for i in range(3):
        assert (prod[i] == value[i]).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("value", [2.5, torch.tensor(2.5)], ids=["float", "0-dim"])
def test_left_broadcast_scalar_over_ranks(shape, value):
    b = left_broadcast(value, shape)
    assert b.shape == (1,) * len(shape)
    assert b.item() == 2.5
    assert (b * torch.ones(shape)).shape == torch.Size(shape)


def test_left_broadcast_keeps_leading_dims():
    value = torch.arange(6.0).reshape(3, 2)
    b = left_broadcast(value, (3, 2, 4, 5))
    assert b.shape == (3, 2, 1, 1)
    assert torch.equal((b * torch.ones(3, 2, 4, 5))[:, :, 3, 4], value)
    assert torch.equal(left_broadcast(value, (3, 2)), value)


def test_left_broadcast_keeps_gradient():
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    (left_broadcast(value, (2, 3, 4)) * torch.ones(2, 3, 4)).sum().backward()
    assert value.grad.tolist() == [12.0, 12.0]


# ---------------------------------------------------------------------------------------------------
# randn
# ---------------------------------------------------------------------------------------------------
def test_randn_single_generator_is_reproducible():
    a = randn((3, 4, 5), gen(1))
    assert a.shape == (3, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, randn((3, 4, 5), gen(1)))
    assert torch.equal(a, torch.randn((3, 4, 5), generator=gen(1)))
    assert not torch.equal(a, randn((3, 4, 5), gen(2)))
    assert randn((2, 3)).shape == (2, 3)
    assert randn((2, 3), gen(0), device="cpu", dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("shape", [(3,), (3, 4), (3, 2, 4, 4)])
def test_randn_per_sample_generators(shape):
    seeds = [11, 12, 13]
    out = randn(shape, [gen(s) for s in seeds])
    assert out.shape == shape
    for i, s in enumerate(seeds):
        # row i depends only on generator i ...
        assert torch.equal(out[i], torch.randn((1, *shape[1:]), generator=gen(s))[0])
    # ... so it does not change with the batch it is drawn in
    other = randn((2, *shape[1:]), [gen(99), gen(12)])
    assert torch.equal(other[1], out[1])
    alone = randn((1, *shape[1:]), (gen(13),))  # a tuple works too
    assert torch.equal(alone[0], out[2])
    assert not torch.equal(out[0], out[1])


def test_randn_per_sample_generators_advance_independently():
    gens = [gen(1), gen(2)]
    first = randn((2, 4), gens)
    second = randn((2, 4), gens)
    assert not torch.equal(first, second)
    g = gen(2)
    torch.randn((1, 4), generator=g)
    assert torch.equal(second[1], torch.randn((1, 4), generator=g)[0])


def test_randn_generator_count_must_match_batch():
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        randn((2, 4), [gen(0), gen(1), gen(2)])


# ---------------------------------------------------------------------------------------------------
# expand_mask and reduce_event
# ---------------------------------------------------------------------------------------------------
def test_expand_mask():
    like = torch.zeros(2, 3, 4)
    assert expand_mask(None, like) is None
    m = expand_mask(torch.tensor([[True, False, True], [False, False, True]]), like)
    assert m.shape == like.shape and m.dtype == like.dtype
    assert m[0, 1].sum() == 0 and m[0, 0].sum() == 4
    assert torch.equal(expand_mask(torch.tensor([1.0, 0.0]), like)[:, 2, 3], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_reduce_event_without_mask(shape):
    x = torch.randn(shape, generator=gen(0))
    flat = x.reshape(shape[0], -1)
    torch.testing.assert_close(reduce_event(x), flat.mean(1))
    torch.testing.assert_close(reduce_event(x, reduction="sum"), flat.sum(1))
    assert reduce_event(x).shape == (shape[0],)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_reduce_event_masked_mean_and_sum(shape):
    x = torch.randn(shape, generator=gen(0))
    mask = (torch.rand(shape, generator=gen(1)) > 0.5).float()
    mask.reshape(shape[0], -1)[:, 0] = 1.0
    xf, mf = x.reshape(shape[0], -1), mask.reshape(shape[0], -1)
    for i in range(shape[0]):
        real = xf[i][mf[i] == 1]
        torch.testing.assert_close(reduce_event(x, mask)[i], real.mean())
        torch.testing.assert_close(reduce_event(x, mask, "sum")[i], real.sum())
    # a bool mask means the same
    torch.testing.assert_close(reduce_event(x, mask.bool()), reduce_event(x, mask))
    # padded values do not matter
    torch.testing.assert_close(reduce_event(x + 100 * (1 - mask), mask), reduce_event(x, mask))


def test_reduce_event_lower_rank_mask_and_empty_rows():
    x = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # per-position mask, row 1 fully padded
    out = reduce_event(x, mask)
    torch.testing.assert_close(out[0], torch.cat([x[0, 0], x[0, 2]]).mean())
    assert out[1].item() == 0.0  # no NaN from 0 / 0
    assert reduce_event(x, mask, "sum")[1].item() == 0.0


# ---------------------------------------------------------------------------------------------------
# gaussian_log_prob
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_normal(shape, reduction):
    g = gen(0)
    x, mean = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    std = torch.rand(shape, generator=g) + 0.1
    lp = Normal(mean.double(), std.double()).log_prob(x.double()).reshape(shape[0], -1)
    expected = lp.mean(1) if reduction == "mean" else lp.sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction=reduction).double(), expected)


def test_gaussian_log_prob_broadcasts_std():
    g = gen(0)
    x, mean = torch.randn((3, 4, 5), generator=g), torch.randn((3, 4, 5), generator=g)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    expected = Normal(mean, std.expand_as(x)).log_prob(x).mean((1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_gaussian_log_prob_masked():
    g = gen(0)
    x, mean = torch.randn((2, 6), generator=g), torch.randn((2, 6), generator=g)
    std = torch.full((2, 6), 0.7)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1]]).float()
    lp = Normal(mean, std).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, mask), (lp * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, mask, "sum"), (lp * mask).sum(1))


def test_gaussian_log_prob_deterministic_entries_contribute_zero():
    g = gen(0)
    x = torch.randn((2, 3, 4), generator=g)
    mean = x + torch.randn((2, 3, 4), generator=g)  # x far from mean where std = 0 must still give 0
    std = torch.rand((2, 3, 4), generator=g) + 0.2
    std[:, 1] = 0.0
    out = gaussian_log_prob(x, mean, std, reduction="sum")
    keep = std > 0
    lp = Normal(mean[keep].reshape(2, -1), std[keep].reshape(2, -1)).log_prob(x[keep].reshape(2, -1))
    torch.testing.assert_close(out, lp.sum(1))
    # mean reduction: deterministic entries count as zeros over all event entries
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), lp.sum(1) / 12)
    # a fully deterministic step has log-prob exactly 0
    assert torch.equal(gaussian_log_prob(x, mean, torch.zeros_like(std)), torch.zeros(2))
    assert torch.equal(gaussian_log_prob(x, mean, torch.zeros(2, 1, 1)), torch.zeros(2))


def test_gaussian_log_prob_no_nan_gradients_at_zero_std():
    g = gen(0)
    x = torch.randn((2, 3, 4), generator=g).requires_grad_(True)
    mean = torch.randn((2, 3, 4), generator=g).requires_grad_(True)
    base = torch.rand((2, 3, 4), generator=g) + 0.2
    base[:, 1] = 0.0
    std = base.clone().requires_grad_(True)
    gaussian_log_prob(x, mean, std).sum().backward()
    for t in (x, mean, std):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[:, 1] == 0).all()  # deterministic entries get no gradient
        assert (t.grad[:, 0] != 0).all()  # stochastic ones do
    # d/dmean of the mean-reduced log-prob is (x - mean) / (D std²)
    expected = ((x - mean) / (12 * base**2)).detach()
    torch.testing.assert_close(mean.grad[:, 0], expected[:, 0])


def test_gaussian_log_prob_constant():
    x = torch.zeros(1, 1)
    assert math.isclose(
        gaussian_log_prob(x, x, torch.ones(1, 1)).item(), -0.5 * math.log(2 * math.pi), rel_tol=1e-6
    )


def test_masked_mse():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    target = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    out = masked_mse(pred, target, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(masked_mse(pred, target), torch.tensor([14.0 / 3, 0.0]))
