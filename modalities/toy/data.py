"""A 2-D Gaussian mixture (components on a circle) and its data modules."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin


class GaussianMixture:
    """`num_components` isotropic Gaussians with means evenly spaced on a circle of `radius`.

    Component k has mean radius·(cos 2πk/K, sin 2πk/K) and std `std`.
    """

    def __init__(self, num_components: int = 4, radius: float = 2.0, std: float = 0.35) -> None:
        self.num_components, self.radius, self.std = num_components, radius, std
        angles = torch.arange(num_components) * 2 * math.pi / num_components
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n points and their component ids."""
        labels = torch.randint(0, self.num_components, (n,), generator=generator)
        points = self.means[labels] + self.std * torch.randn((n, 2), generator=generator)
        return points, labels

    def log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """Log-density of each point under its own component."""
        d2 = ((x - self.means.to(x.device)[labels]) ** 2).sum(-1)
        return -d2 / (2 * self.std**2) - 2 * math.log(self.std) - math.log(2 * math.pi)


def _collate(rows: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    points, labels = zip(*rows, strict=True)
    return {"sample": torch.stack(points), "prompt": torch.stack(labels)}


class MixtureDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Samples of the mixture with their component ids, for pretraining the toy base model.

    Args:
        num_samples: size of the (fixed, seeded) training set.
        batch_size: samples per batch.
        batches_per_epoch: batches per epoch (drawn with a per-epoch seeded permutation).
        num_components, radius, std: the mixture.
        seed: data and order seed.
        eval_seeds_per_prompt: evaluation samples per component.
    """

    def __init__(
        self,
        num_samples: int = 8192,
        batch_size: int = 256,
        batches_per_epoch: int = 32,
        num_components: int = 4,
        radius: float = 2.0,
        std: float = 0.35,
        seed: int = 0,
        eval_seeds_per_prompt: int = 16,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        self.mixture = GaussianMixture(num_components, radius, std)
        self.num_samples, self.batch_size, self.batches_per_epoch = num_samples, batch_size, batches_per_epoch
        self.seed = seed
        self.eval_prompts = list(range(num_components))
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed
        points, labels = self.mixture.sample(num_samples, torch.Generator().manual_seed(seed))
        self.dataset = TensorDataset(points, labels)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            self.num_samples,
            self.batch_size * self.batches_per_epoch,
            self.seed,
            replacement=False,
            batch_size=self.batch_size,
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_collate)
