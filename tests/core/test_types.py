"""Batched containers: validation, indexing, concatenation, dtype moves, detach and the fake builder."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from diffalign.core.testing import fake_trajectory
from diffalign.core.types import PreferencePair, Trajectory

B, T = 4, 3


def assert_same(a, b) -> None:
    """Field-by-field equality of two batches (tensors, dicts, lists, None)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        _assert_value(va, vb, f.name)


def _assert_value(va, vb, name) -> None:
    if isinstance(va, torch.Tensor):
        assert isinstance(vb, torch.Tensor), name
        assert va.dtype == vb.dtype, name
        assert torch.equal(va, vb), name
    elif isinstance(va, dict):
        assert set(va) == set(vb), name
        for k in va:
            _assert_value(va[k], vb[k], f"{name}.{k}")
    else:
        assert va == vb, name


def make_traj(batch: int = B, steps: int = T, event=(2, 3)) -> Trajectory:
    g = torch.Generator().manual_seed(0)
    return Trajectory(
        states=torch.randn((batch, steps + 1, *event), generator=g),
        timesteps=torch.arange(steps, 0, -1).expand(batch, -1).clone() * 100 + torch.arange(batch)[:, None],
        log_probs=torch.randn((batch, steps), generator=g),
        cond={"label": torch.arange(batch) * 10, "nested": {"emb": torch.randn((batch, 5), generator=g)}},
        mask=(torch.rand((batch, *event), generator=g) > 0.5).float(),
        rewards=torch.arange(batch, dtype=torch.float32),
        advantages=torch.randn((batch, steps), generator=g),
        extras={"prompt": [f"p{i}" for i in range(batch)], "group": torch.arange(batch) // 2, "tag": "run-1"},
    )


def expected_rows(traj: Trajectory, rows: list[int]) -> Trajectory:
    """The batch made of `rows`, built field by field without __getitem__."""
    r = torch.tensor(rows, dtype=torch.long)
    return Trajectory(
        states=traj.states[r],
        timesteps=traj.timesteps[r],
        log_probs=traj.log_probs[r],
        cond={"label": traj.cond["label"][r], "nested": {"emb": traj.cond["nested"]["emb"][r]}},
        mask=traj.mask[r],
        rewards=traj.rewards[r],
        advantages=traj.advantages[r],
        extras={
            "prompt": [traj.extras["prompt"][i] for i in rows],
            "group": traj.extras["group"][r],
            "tag": traj.extras["tag"],
        },
    )


# ---------------------------------------------------------------------------------------------------
# Validation and properties
# ---------------------------------------------------------------------------------------------------
def test_trajectory_rejects_bad_shapes():
    lp = torch.zeros(B, T)
    ts = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="states must be"):
        Trajectory(states=torch.zeros(B, T + 1), timesteps=ts, log_probs=lp)
    with pytest.raises(ValueError, match="timesteps"):
        Trajectory(states=torch.zeros(B, T + 1, 2), timesteps=torch.zeros(B, T + 1), log_probs=lp)
    with pytest.raises(ValueError, match="log_probs"):
        Trajectory(states=torch.zeros(B, T + 1, 2), timesteps=ts, log_probs=torch.zeros(B, T - 1))
    with pytest.raises(ValueError, match="log_probs"):
        Trajectory(states=torch.zeros(B, T + 1, 2), timesteps=ts, log_probs=torch.zeros(B + 1, T))
    Trajectory(states=torch.zeros(B, T + 1, 2), timesteps=ts, log_probs=lp)  # the right shapes pass


@pytest.mark.parametrize("event", [(2,), (3, 8), (4, 8, 8), (2, 4, 8, 8)])
def test_trajectory_properties(event):
    traj = make_traj(event=event)
    assert len(traj) == traj.batch_size == B
    assert traj.num_steps == T
    assert traj.event_shape == torch.Size(event)
    assert traj.x0.shape == (B, *event)
    assert torch.equal(traj.x0, traj.states[:, -1])


def test_trajectory_defaults():
    traj = Trajectory(states=torch.zeros(2, 3, 1), timesteps=torch.zeros(2, 2), log_probs=torch.zeros(2, 2))
    assert traj.cond == {} and traj.extras == {}
    assert traj.mask is None and traj.rewards is None and traj.advantages is None
    other = Trajectory(states=torch.zeros(2, 3, 1), timesteps=torch.zeros(2, 2), log_probs=torch.zeros(2, 2))
    assert traj.cond is not other.cond  # no shared mutable default


def test_preference_pair_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="winner"):
        PreferencePair(cond={}, winner=torch.zeros(2, 3), loser=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="winner"):
        PreferencePair(cond={}, winner=torch.zeros(2, 3), loser=torch.zeros(3, 3))
    pair = PreferencePair(cond={}, winner=torch.zeros(2, 3), loser=torch.ones(2, 3))
    assert len(pair) == pair.batch_size == 2


# ---------------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", [0, 2, 3, -1, -2, -4])
def test_int_index_keeps_batch_dim(i):
    traj = make_traj()
    row = traj[i]
    assert len(row) == 1
    assert row.states.shape == (1, T + 1, 2, 3)
    assert_same(row, expected_rows(traj, [i % B]))


def test_int_index_out_of_range_raises_and_iteration_ends():
    traj = make_traj()
    for i in (B, B + 3, -B - 1):
        with pytest.raises(IndexError):
            traj[i]
    rows = list(itertools.islice(iter(traj), B + 2))  # iteration must stop after B rows
    assert len(rows) == B
    for i, row in enumerate(rows):
        assert_same(row, expected_rows(traj, [i]))


def test_zero_dim_tensor_index_acts_like_int():
    traj = make_traj()
    i = traj.rewards.argmax()
    assert i.dim() == 0
    assert_same(traj[i], expected_rows(traj, [B - 1]))


@pytest.mark.parametrize(
    "index, rows",
    [
        (slice(1, 3), [1, 2]),
        (slice(None, None, 2), [0, 2]),
        (slice(-2, None), [2, 3]),
        (torch.tensor([True, False, True, True]), [0, 2, 3]),
        (torch.tensor([3, 0, 0]), [3, 0, 0]),
        ([3, 1], [3, 1]),
        ((2,), [2]),
        ([True, False, False, True], [0, 3]),
        (np.array([False, True, True, False]), [1, 2]),
        (np.array([2, 0]), [2, 0]),
        ([], []),
    ],
    ids=[
        "slice",
        "step-slice",
        "neg-slice",
        "bool-tensor",
        "index-tensor",
        "list",
        "tuple",
        "bool-list",
        "np-bool",
        "np-int",
        "empty",
    ],
)
def test_index_variants(index, rows):
    traj = make_traj()
    out = traj[index]
    assert len(out) == len(rows)
    assert_same(out, expected_rows(traj, rows))


def test_indexing_leaves_source_untouched_and_non_batched_extras_pass_through():
    traj = make_traj()
    before = make_traj()
    out = traj[[1, 2]]
    assert out.extras["tag"] == "run-1"
    assert out.extras["prompt"] == ["p1", "p2"]
    assert torch.equal(out.cond["nested"]["emb"], traj.cond["nested"]["emb"][1:3])
    assert_same(traj, before)


def test_none_fields_stay_none_when_indexed():
    traj = fake_trajectory(batch=3, steps=2)
    assert traj.mask is None
    assert traj[1].mask is None and traj[[0, 2]].mask is None


def test_preference_pair_indexing():
    g = torch.Generator().manual_seed(0)
    pair = PreferencePair(
        cond={"label": torch.arange(B)},
        winner=torch.randn((B, 2, 3), generator=g),
        loser=torch.randn((B, 2, 3), generator=g),
        margin=torch.linspace(0, 1, B),
        mask_winner=torch.ones(B, 2),
        step_labels=torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 1]]),
    )
    for index, rows in (
        (2, [2]),
        (-1, [3]),
        (slice(0, 2), [0, 1]),
        (torch.tensor([True, False, False, True]), [0, 3]),
        ([3, 1], [3, 1]),
    ):
        out = pair[index]
        r = torch.tensor(rows)
        assert len(out) == len(rows)
        assert torch.equal(out.winner, pair.winner[r])
        assert torch.equal(out.loser, pair.loser[r])
        assert torch.equal(out.cond["label"], pair.cond["label"][r])
        assert torch.equal(out.margin, pair.margin[r])
        assert torch.equal(out.mask_winner, pair.mask_winner[r])
        assert torch.equal(out.step_labels, pair.step_labels[r])
        assert out.mask_loser is None
    with pytest.raises(IndexError):
        pair[B]


# ---------------------------------------------------------------------------------------------------
# cat, to, detach
# ---------------------------------------------------------------------------------------------------
def test_cat_round_trips_split():
    traj = make_traj()
    joined = Trajectory.cat([traj[:1], traj[1:3], traj[3]])
    assert_same(joined, traj)


def test_cat_concatenates_every_field():
    a, b = fake_trajectory(batch=2, seed=0), fake_trajectory(batch=3, seed=1)
    c = Trajectory.cat([a, b])
    assert len(c) == 5
    assert torch.equal(c.states, torch.cat([a.states, b.states]))
    assert torch.equal(c.cond["label"], torch.cat([a.cond["label"], b.cond["label"]]))
    assert torch.equal(c.rewards, torch.cat([a.rewards, b.rewards]))
    assert c.extras["prompt"] == a.extras["prompt"] + b.extras["prompt"]
    assert c.mask is None


def test_cat_errors():
    with pytest.raises(ValueError, match="at least one"):
        Trajectory.cat([])
    with_mask, without = fake_trajectory(with_mask=True), fake_trajectory()
    with pytest.raises(ValueError, match="None"):
        Trajectory.cat([without, with_mask])
    other = fake_trajectory()
    other.cond = {"other": other.cond["label"]}
    with pytest.raises(ValueError, match="keys"):
        Trajectory.cat([fake_trajectory(), other])


def test_preference_pair_cat():
    p1 = PreferencePair(
        cond={"label": torch.tensor([0])},
        winner=torch.zeros(1, 2),
        loser=torch.ones(1, 2),
        margin=torch.tensor([1.0]),
    )
    p2 = PreferencePair(
        cond={"label": torch.tensor([5, 6])},
        winner=torch.ones(2, 2),
        loser=torch.zeros(2, 2),
        margin=torch.tensor([0.5, 0.5]),
    )
    p = PreferencePair.cat([p1, p2])
    assert len(p) == 3
    assert p.cond["label"].tolist() == [0, 5, 6]
    assert p.winner.tolist() == [[0, 0], [1, 1], [1, 1]]
    assert p.margin.tolist() == [1.0, 0.5, 0.5]
    assert p.mask_winner is None


@pytest.mark.parametrize(
    "call",
    [
        lambda x: x.to(torch.float64),
        lambda x: x.to(dtype=torch.float64),
        lambda x: x.to("cpu", torch.float64),
        lambda x: x.to(device="cpu", dtype=torch.float64),
    ],
    ids=["positional", "dtype-kw", "device-dtype", "kwargs"],
)
def test_to_dtype_moves_floats_only(call):
    traj = make_traj()
    traj.extras["flags"] = torch.tensor([True, False, True, False])
    moved = call(traj)
    assert moved.states.dtype == moved.log_probs.dtype == moved.mask.dtype == torch.float64
    assert moved.rewards.dtype == moved.advantages.dtype == torch.float64
    assert moved.cond["nested"]["emb"].dtype == torch.float64
    assert moved.timesteps.dtype == traj.timesteps.dtype == torch.long
    assert moved.cond["label"].dtype == torch.long
    assert moved.extras["group"].dtype == torch.long
    assert moved.extras["flags"].dtype == torch.bool
    assert moved.extras["prompt"] == traj.extras["prompt"]
    assert torch.equal(moved.timesteps, traj.timesteps)
    torch.testing.assert_close(moved.states, traj.states.double())
    assert traj.states.dtype == torch.float32  # the source is unchanged


def test_to_device_keeps_dtypes():
    traj = make_traj()
    moved = traj.to("cpu")
    assert_same(moved, traj)


def test_preference_pair_to_keeps_integer_labels():
    pair = PreferencePair(
        cond={"ids": torch.tensor([[1, 2]])},
        winner=torch.zeros(1, 2),
        loser=torch.zeros(1, 2),
        step_labels=torch.tensor([[1, -1]]),
    )
    half = pair.to(torch.bfloat16)
    assert half.winner.dtype == half.loser.dtype == torch.bfloat16
    assert half.step_labels.dtype == torch.long and half.cond["ids"].dtype == torch.long


def test_detach_cuts_the_graph():
    traj = make_traj()
    w = torch.tensor(2.0, requires_grad=True)
    traj.log_probs = traj.log_probs * w
    traj.cond = traj.cond.replace(nested=traj.cond["nested"].replace(emb=traj.cond["nested"]["emb"] * w))
    assert traj.log_probs.requires_grad
    d = traj.detach()
    assert not d.log_probs.requires_grad and not d.cond["nested"]["emb"].requires_grad
    assert torch.equal(d.log_probs, traj.log_probs.detach())
    assert d.extras["prompt"] == traj.extras["prompt"]
    assert traj.log_probs.requires_grad  # the source keeps its graph


# ---------------------------------------------------------------------------------------------------
# Fake trajectory builder
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event", [(2,), (4, 8, 8)])
def test_fake_trajectory_shapes(event):
    traj = fake_trajectory(batch=3, steps=5, event_shape=event, with_mask=True)
    assert traj.states.shape == (3, 6, *event)
    assert traj.timesteps.shape == traj.log_probs.shape == (3, 5)
    assert traj.timesteps.dtype == torch.long
    assert traj.timesteps[:, 0].tolist() == [999] * 3 and traj.timesteps[:, -1].tolist() == [0] * 3
    assert (traj.timesteps[:, :-1] > traj.timesteps[:, 1:]).all()
    assert traj.mask.shape == (3, *event)
    assert set(traj.mask.unique().tolist()) <= {0.0, 1.0}
    assert traj.rewards.shape == traj.advantages.shape == (3,)
    assert traj.cond["label"].tolist() == [0, 1, 0]
    assert traj.extras["prompt"] == ["p0", "p1", "p2"]


def test_fake_trajectory_is_seeded():
    assert_same(fake_trajectory(seed=3), fake_trajectory(seed=3))
    assert not torch.equal(fake_trajectory(seed=3).states, fake_trajectory(seed=4).states)
    assert fake_trajectory().mask is None
