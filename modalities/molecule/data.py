"""The shipped conformer dataset and its data module (pretraining batches and an evaluation set)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin
from diffalign.modalities.molecule.backbone import DATASET
from diffalign.modalities.molecule.sample import ELEMENTS


class ConformerDataset(Dataset):
    """Heavy-atom conformers from `conformers.npz` (built by `build_dataset`), in the data layout.

    Item i is (x (N_max, 3 + K): positions Å then one-hot types, padded rows zero; number of atoms).

    Args:
        path: the .npz file (path or pkg:// spec).
        elements: one-hot order; must match the file's elements (a prefix is not accepted).
        max_atoms: pad to this many atoms (>= the file's N_max).
    """

    def __init__(
        self, path: str = DATASET, elements: tuple[str, ...] = ELEMENTS, max_atoms: int | None = None
    ):
        from diffalign.core.io import resolve_path

        with np.load(resolve_path(path)) as d:
            pos, types, num = d["positions"], d["types"].astype(np.int64), d["num_atoms"].astype(np.int64)
            self.smiles = [str(s) for s in d["smiles"]]
            file_elements = tuple(str(e) for e in d["elements"])
        if file_elements != tuple(elements):
            raise ValueError(f"dataset elements {file_elements} differ from the model's {tuple(elements)}")
        n_max = pos.shape[1] if max_atoms is None else max_atoms
        if n_max < pos.shape[1]:
            raise ValueError(f"max_atoms={n_max} is below the dataset's {pos.shape[1]}")
        k = len(elements)
        x = np.zeros((len(num), n_max, 3 + k), np.float32)
        x[:, : pos.shape[1], :3] = pos
        real = types >= 0
        onehot = np.eye(k, dtype=np.float32)[np.where(real, types, 0)] * real[..., None]
        x[:, : pos.shape[1], 3:] = onehot
        self.x = torch.from_numpy(x)
        self.num_atoms = torch.from_numpy(num)

    def __len__(self) -> int:
        return len(self.num_atoms)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.num_atoms[i]


def collate_conformers(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    xs, ns = zip(*rows, strict=True)
    x = torch.stack(xs)
    mask = (x[..., 3:].sum(-1, keepdim=True) > 0).float()
    return {"sample": x, "mask": mask, "num_atoms": torch.stack(ns)}


class MoleculeDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Conformer batches for pretraining: {"sample": (B, N_max, 3 + K), "mask": (B, N_max, 1),
    "num_atoms": (B,)}; `backbone.encode(batch["sample"])` maps them to model space.

    The evaluation set is unconditional: prompt 0 (draw the atom count) × `eval_seeds_per_prompt` seeds.

    Args:
        path: the conformer file.
        max_atoms: padded size (the backbone's N_max).
        batch_size, batches_per_epoch: batches of a seeded per-epoch permutation.
        seed: order seed.
        random_rotation: rotate each batch molecule by a random rotation (not needed by the equivariant
            EGNN; useful for non-equivariant backbones).
        eval_seeds_per_prompt, eval_seed: evaluation set.
    """

    def __init__(
        self,
        path: str = DATASET,
        max_atoms: int = 15,
        batch_size: int = 64,
        batches_per_epoch: int = 32,
        seed: int = 0,
        random_rotation: bool = False,
        eval_seeds_per_prompt: int = 64,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        self.dataset = ConformerDataset(path, max_atoms=max_atoms)
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.random_rotation = random_rotation
        self.eval_prompts = [0]
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def _collate(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        batch = collate_conformers(rows)
        if self.random_rotation:
            q, _ = torch.linalg.qr(torch.randn(len(rows), 3, 3))
            batch["sample"][..., :3] = batch["sample"][..., :3] @ q
        return batch

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.dataset),
            self.batch_size * self.batches_per_epoch,
            self.seed,
            replacement=False,
            batch_size=self.batch_size,
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate)
