"""scikit-learn's handwritten digits (1,797 images, 8×8, values 0–16) as a small image dataset.

Images are upsampled bilinearly to `image_size` and scaled to [0, 1] (the sample layout's range; the
backbone's `encode` maps them to [−1, 1]). Each image's prompt is "a handwritten {d}". A seeded split
holds out `holdout_fraction` of the images (the digit classifier is scored on it).
"""

from __future__ import annotations

from functools import lru_cache

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin
from diffalign.core.extras import require
from diffalign.modalities.image.conditioning import DIGIT_PROMPTS, digit_prompt


@lru_cache(maxsize=4)
def _load(image_size: int) -> tuple[Tensor, Tensor]:
    load_digits = require("sklearn.datasets", "image", "the handwritten digits data").load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1), torch.tensor(d.target, dtype=torch.long)


def load_digit_images(
    image_size: int = 16, split: str = "all", holdout_fraction: float = 0.2, split_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Digit images (N, 1, image_size, image_size) in [0, 1] and labels (N,).

    Args:
        split: "train", "test" (the held-out part) or "all".
        holdout_fraction: share of the images held out (a seeded permutation, `split_seed`).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    x, y = _load(image_size)
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * holdout_fraction))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    idx = idx.sort().values
    return x[idx].clone(), y[idx].clone()


def noisy_captions(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Caption labels where a seeded `fraction` of the rows name a uniformly random digit instead.

    Web captions are often wrong; a model trained on such pairs follows prompts only in part, which is
    the room alignment has to improve. A replaced caption can name the true digit by chance (1 in 10).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    replace = torch.rand(len(labels), generator=g) < fraction
    random_digits = torch.randint(0, 10, (len(labels),), generator=g)
    return torch.where(replace, random_digits, labels)


class DigitDataset(Dataset):
    """(image (1, H, W) in [0, 1], digit named by its caption) pairs."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def _collate(rows: list[tuple[Tensor, int]]) -> dict[str, object]:
    images, labels = zip(*rows, strict=True)
    return {"sample": torch.stack(images), "prompt": [digit_prompt(d) for d in labels]}


class DigitsDataModule(EvaluationSetMixin, L.LightningDataModule):
    """The digits' training split for pretraining.

    Batches are `{"sample": (B, 1, H, W) in [0, 1], "prompt": ["a handwritten 3", ...]}`.

    The evaluation set is the 10 digit prompts × `eval_seeds_per_prompt` seeds.

    Args:
        image_size: side of the upsampled images.
        batch_size: images per batch.
        batches_per_epoch: batches per epoch (a per-epoch seeded permutation of the training split).
        holdout_fraction, split_seed: the held-out split (never trained on).
        caption_noise: share of training images whose prompt names a random digit (a fixed, seeded
            choice per image, `noisy_captions`); 0 keeps every caption true.
        seed: order seed (and the caption-noise seed).
        eval_seeds_per_prompt, eval_seed: the fixed evaluation set.
    """

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 64,
        batches_per_epoch: int = 22,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        caption_noise: float = 0.0,
        seed: int = 0,
        eval_seeds_per_prompt: int = 16,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        self.image_size, self.batch_size, self.batches_per_epoch = image_size, batch_size, batches_per_epoch
        self.seed = seed
        images, labels = load_digit_images(image_size, "train", holdout_fraction, split_seed)
        self.caption_noise = caption_noise
        self.dataset = DigitDataset(images, noisy_captions(labels, caption_noise, seed))
        self.eval_prompts = list(DIGIT_PROMPTS)
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.dataset),
            self.batch_size * self.batches_per_epoch,
            self.seed,
            replacement=False,
            batch_size=self.batch_size,
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_collate)
