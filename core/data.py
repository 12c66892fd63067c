"""Data modules: batches of conditions (prompts) for online alignment, and the fixed evaluation set.

A batch is a dict; online methods get `{"prompt": [...]}` and the backbone's `encode_condition` turns
it into tensors. Shuffling is seeded per epoch, so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """Random order (with replacement or a permutation) that depends only on (seed, epoch)."""

    def __init__(self, size: int, num_samples: int, seed: int = 0, replacement: bool = True) -> None:
        self.size, self.num_samples, self.seed, self.replacement = size, num_samples, seed, replacement
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.replacement:
            return iter(torch.randint(0, self.size, (self.num_samples,), generator=g).tolist())
        reps = -(-self.num_samples // self.size)
        order = torch.cat([torch.randperm(self.size, generator=g) for _ in range(reps)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


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
        return DataLoader(
            self.evaluation_set(),
            batch_size=self.eval_batch_size,
            shuffle=False,
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
        sampler = EpochSeededSampler(len(self.prompts), self.batch_size * self.batches_per_epoch, self.seed)
        return DataLoader(
            _ListDataset(self.prompts),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_prompts,
            num_workers=0,
        )
