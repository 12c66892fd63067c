"""How data, seeds and noise split over ranks, checked without starting processes (ranks given
explicitly); the multi-process runs are in test_ddp.py."""

from __future__ import annotations

import pytest
import torch

from diffalign.core.data import EpochSeededSampler, ShardSampler
from diffalign.core.distributed import Ranks, RowShard, launch_rank, shard_contiguous
from diffalign.core.functional import masked_noise
from diffalign.core.module import aligned_steps, rank_seed


def _ranks(world: int, **kwargs) -> list[list[int]]:
    return [list(EpochSeededSampler(rank=r, num_replicas=world, **kwargs)) for r in range(world)]


@pytest.mark.parametrize("replacement", [False, True])
def test_each_global_batch_is_the_single_process_batch_split_in_rank_blocks(replacement):
    one = list(EpochSeededSampler(10, 24, seed=3, replacement=replacement, batch_size=8))
    two = _ranks(2, size=10, num_samples=24, seed=3, replacement=replacement, batch_size=4)
    assert len(two[0]) == len(two[1]) == 12  # 3 global steps of 2 × 4
    for step in range(3):
        blocks = two[0][4 * step : 4 * step + 4] + two[1][4 * step : 4 * step + 4]
        assert blocks == one[8 * step : 8 * step + 8]


def test_preference_rows_are_sharded_without_duplication():
    # one epoch = one pass over 32 rows (a permutation), 4 global steps of 2 ranks × 4
    parts = _ranks(2, size=32, num_samples=32, seed=0, replacement=False, batch_size=4)
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(32))


def test_an_epoch_that_does_not_fill_its_last_global_batch_wraps_around_equally():
    parts = _ranks(2, size=12, num_samples=12, seed=1, replacement=False, batch_size=4)  # 1.5 global steps
    assert len(parts[0]) == len(parts[1]) == 8  # every rank has as many batches (else DDP hangs)
    order = EpochSeededSampler(12, 12, seed=1, replacement=False).epoch_order()
    assert parts[1][4:] == order[:4]  # the missing block is the epoch's first


def test_the_epoch_order_depends_on_seed_and_epoch_only():
    s = EpochSeededSampler(10, 20, seed=5, replacement=False, batch_size=2, num_replicas=2, rank=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


def test_evaluation_shards_are_contiguous_and_unpadded():
    parts = [list(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(range(7))[shard_contiguous(7, r, 3)] for r in range(3)] == parts
    assert list(ShardSampler(5)) == list(range(5))  # one process: the whole set in order


def test_lightning_leaves_our_samplers_alone():
    from torch.utils.data import DistributedSampler

    assert isinstance(EpochSeededSampler(4, 8), DistributedSampler)
    assert isinstance(ShardSampler(4), DistributedSampler)


def test_row_draws_of_a_global_batch_cut_into_rank_slices():
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    whole = masked_noise((6, 3), g())
    parts = [RowShard(0, 4, 6).noise((4, 3), g()), RowShard(4, 2, 6).noise((2, 3), g())]
    assert torch.equal(torch.cat(parts), whole)
    # one process: exactly masked_noise, mask included
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    assert torch.equal(RowShard(0, 6, 6).noise((6, 3), g(), mask), masked_noise((6, 3), g(), mask))
    # padded samples: the global draw is at the largest event shape, each rank crops its own
    crop = RowShard(0, 2, 4, event=(5,)).noise((2, 3), g())
    assert torch.equal(crop, masked_noise((4, 5), g())[:2, :3])


def test_one_process_collectives_are_identities():
    ranks = Ranks()
    t = torch.arange(5.0)
    assert ranks.gather(t) is t and ranks.gather_lists(["a"]) == ["a"]
    assert ranks.rows(5) == RowShard(0, 5, 5)
    assert ranks.reduce_metrics({"x": 1.0}) == {"x": 1.0}
    assert list(aligned_steps(ranks, iter([[1, 2], [3]]))) == [([1, 2], 2), ([3], 1)]
    with pytest.raises(ValueError, match="outside"):
        Ranks(2, 2)


def test_rank_streams_differ_per_rank_and_batch_and_repeat():
    seeds = {rank_seed(0, r, e, b) for r in range(4) for e in range(3) for b in range(5)}
    assert len(seeds) == 4 * 3 * 5
    assert rank_seed(0, 1, 2, 3) == rank_seed(0, 1, 2, 3) != rank_seed(1, 1, 2, 3)


@pytest.mark.parametrize(
    "env, rank",
    [({}, 0), ({"RANK": "3"}, 3), ({"LOCAL_RANK": "1"}, 1), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, 1)],
)
def test_launch_rank_reads_the_launchers_environment(monkeypatch, env, rank):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch_rank() == rank


class _TwoRanks(Ranks):
    """Rank 0 of 2 whose gather returns this rank's object and a given one for rank 1 (no processes)."""

    def __init__(self, other) -> None:
        super().__init__(0, 2)
        self.other = other

    def gather_objects(self, obj):
        return [obj, self.other]


def _meter(keys, feats, gold, kls):
    from diffalign.core.guards import GuardMeter

    m = GuardMeter(module=None, gold=object(), features=lambda s, c: None, kl=True, bandwidth=None)
    m.keys, m.feats, m.gold_scores, m.kls, m.stochastic_steps = list(keys), [feats], list(gold), list(kls), 3
    return m


def test_guard_meter_drops_padding_rows_and_gathers_the_whole_set_in_rank_order():
    """The shards 0..4 | 5..8 (+ a padding repeat of row 8) give the guard values of the 9 rows at once."""
    feats = torch.arange(18.0).reshape(9, 2) ** 1.5
    keys = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    gold = [float(i) for i in range(9)]
    kls = [0.1 * i for i in range(9)]
    whole = _meter(keys, feats, gold, kls)
    whole.finish(9, Ranks())
    # rank 1's shard: rows 5..8 and the padding repeat of row 8, trimmed to its 4 real rows before the gather
    r1 = _meter(keys[5:] + ["c"], torch.cat([feats[5:], feats[8:]]), gold[5:] + [8.0], kls[5:] + [0.8])
    r1.finish(4, Ranks())
    other = {
        "keys": r1.keys, "feats": r1.feats[0], "gold": r1.gold_scores, "kls": r1.kls, "steps": 3,
        "notes": [], "features": True, "kl": True,
    }  # fmt: skip
    r0 = _meter(keys[:5], feats[:5], gold[:5], kls[:5])
    r0.finish(5, _TwoRanks(other))
    assert r0.keys == keys and torch.equal(r0.feats[0], feats)
    a, b = whole.result(), r0.result()
    assert a == b and a["gold_mean"] == 4.0 and a["diversity_prompts"] == 3
