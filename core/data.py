"""Data modules: batches of conditions (prompts) for online alignment, and the fixed evaluation set.

A batch is a dict; online methods get `{"prompt": [...]}` and the backbone's `encode_condition` turns
it into tensors. Shuffling is seeded per epoch, so a resumed run sees the same batches as an
uninterrupted one.

With several processes, the samplers here split the data themselves (Lightning leaves a
`DistributedSampler` alone): each optimiser step's global batch is the next `world × batch_size` items
of the epoch's order and rank r takes the r-th block of `batch_size` of them, so a global batch holds
the items one process with batch `world × batch_size` would get, with no item on two ranks. The
evaluation set is split into contiguous shards without padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffalign.core.distributed import Ranks, shard_contiguous


class _RankAwareSampler(DistributedSampler):
    """Base of the samplers that split data across processes themselves.

    It subclasses `DistributedSampler` only so that Lightning does not wrap it in its own (which would
    interleave items and pad the evaluation set); it reads the process group when iterated, unless
    `num_replicas` and `rank` are given.
    """

    def __init__(self, num_replicas: int | None = None, rank: int | None = None) -> None:
        # DistributedSampler.__init__ is not called: it needs a process group at construction
        self._replicas, self._rank = num_replicas, rank
        self.epoch = 0

    def world(self) -> tuple[int, int]:
        """(number of processes, this process's rank)."""
        if self._replicas is not None:
            return self._replicas, self._rank or 0
        ranks = Ranks.current()
        return ranks.world_size, ranks.rank

    @property
    def num_replicas(self) -> int:  # what DistributedSampler's readers look at
        return self.world()[0]

    @property
    def rank(self) -> int:
        return self.world()[1]

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch


class EpochSeededSampler(_RankAwareSampler):
    """Random order (with replacement or a permutation) that depends only on (seed, epoch).

    With several processes, the epoch's order is cut into global batches of `world × batch_size` items
    and rank r takes the r-th `batch_size` block of each; when the epoch does not fill its last global
    batch, the missing blocks wrap around to the epoch's start (so every rank has as many batches).

    Args:
        size: number of items to draw from.
        num_samples: items per epoch (over all ranks).
        seed: order seed.
        replacement: draw with replacement, else permutations.
        batch_size: items a rank takes per step (the data loader's batch size).
        num_replicas, rank: the processes (default: the process group when iterated).
    """

    def __init__(
        self,
        size: int,
        num_samples: int,
        seed: int = 0,
        replacement: bool = True,
        batch_size: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.num_samples, self.seed, self.replacement = size, num_samples, seed, replacement
        self.batch_size = batch_size

    def epoch_order(self) -> list[int]:
        """The epoch's items over all ranks, in order (what one process iterates)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.replacement:
            return torch.randint(0, self.size, (self.num_samples,), generator=g).tolist()
        reps = -(-self.num_samples // self.size)
        order = torch.cat([torch.randperm(self.size, generator=g) for _ in range(reps)])
        return order[: self.num_samples].tolist()

    def _steps(self, world: int) -> int:
        return -(-self.num_samples // (self.batch_size * world))

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        world, rank = self.world()
        if world == 1:
            return iter(order)
        steps, bs = self._steps(world), self.batch_size
        need = steps * bs * world
        padded = (order * (-(-need // len(order))))[:need] if order else []
        mine = [padded[(k * world + rank) * bs + i] for k in range(steps) for i in range(bs)]
        return iter(mine)

    def __len__(self) -> int:
        world = self.world()[0]
        return self.num_samples if world == 1 else self._steps(world) * self.batch_size


class ShardSampler(_RankAwareSampler):
    """Items 0..n-1 in order, each rank taking one contiguous shard (no padding: shards may differ by
    one item). Concatenating the ranks' shards in rank order gives the original order."""

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(num_replicas, rank)
        self.n = n

    def _shard(self) -> range:
        world, rank = self.world()
        part = shard_contiguous(self.n, rank, world)
        return range(part.start, part.stop)

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


class _ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def collate_prompts(items: list[Any]) -> dict[str, list[Any]]:
    """Batch prompts as a plain list (strings, ints, or dicts of either)."""
    return {"prompt": list(items)}


def collate_evaluation(rows: list[tuple[Any, int]]) -> dict[str, list[Any]]:
    return {"prompt": [p for p, _ in rows], "seed": [s for _, s in rows]}


class EvaluationSetMixin:
    """Gives a data module a fixed evaluation set: each prompt × `eval_seeds_per_prompt` seeds.

    `diffalign validate / test / predict` iterate it ({"prompt": [...], "seed": [...]} batches);
    `fit` does not validate (the RewardEvaluation callback scores the set before and after training).
    """

    eval_prompts: list[Any]
    eval_seeds_per_prompt: int
    eval_seed: int
    eval_batch_size: int = 64

    def _evaluation_loader(self) -> DataLoader:
        pairs = self.evaluation_set()
        return DataLoader(
            pairs,
            batch_size=self.eval_batch_size,
            sampler=ShardSampler(len(pairs)),  # with several processes: one contiguous shard per rank
            collate_fn=collate_evaluation,
        )

    def val_dataloader(self) -> DataLoader | list:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            return []
        return self._evaluation_loader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader()

    def evaluation_set(self) -> list[tuple[Any, int]]:
        """Fixed (prompt, seed) pairs (`core.sampling.seed_pairs`); the same before and after training."""
        from diffalign.core.sampling import seed_pairs

        return seed_pairs(self.eval_prompts, self.eval_seeds_per_prompt, self.eval_seed)


class PromptDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Conditions for online alignment, drawn at random from a list or a text file (one per line).

    Args:
        prompts: the conditions (strings for text-conditioned models, ints for class-conditioned, or a
            dict per prompt of structured metadata such as `{digit: 3, direction: left}`).
        prompt_file: a text file with one prompt per line (used when `prompts` is not given).
        batch_size: conditions per rollout batch.
        batches_per_epoch: rollout batches per epoch.
        seed: seed of the per-epoch order.
        eval_prompts: conditions of the evaluation set (default: `prompts`).
        eval_seeds_per_prompt: samples per evaluation condition.
        eval_seed: first seed of the evaluation set.
    """

    def __init__(
        self,
        prompts: list[str | int | dict[str, Any]] | None = None,
        prompt_file: str | None = None,
        batch_size: int = 16,
        batches_per_epoch: int = 1,
        seed: int = 0,
        eval_prompts: list[str | int | dict[str, Any]] | None = None,
        eval_seeds_per_prompt: int = 8,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        if prompts is None:
            if prompt_file is None:
                raise ValueError("PromptDataModule needs `prompts` or `prompt_file`")
            path = Path(prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompt_file not found: {path}")
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"prompt_file {path} has no non-empty line")
        if not prompts:
            raise ValueError("PromptDataModule: `prompts` is empty")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else list(self.prompts)
        self.eval_seeds_per_prompt = eval_seeds_per_prompt
        self.eval_seed = eval_seed

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.prompts), self.batch_size * self.batches_per_epoch, self.seed, batch_size=self.batch_size
        )
        return DataLoader(
            _ListDataset(self.prompts),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_prompts,
            num_workers=0,
        )
