"""Datasets of primitive point clouds generated in code (`primitives.py`), and the pretraining data module.

`make_dataset(count, seed, ...)` draws `count` random primitives (`random_spec`) with point counts
uniform in [min_points, max_points] and returns them padded: points (M, max_points, 3), a mask, the
specs and canonical captions. A fixed seed gives the same dataset on every machine; datasets are cached
per process. The training set uses seed 0, held-out reference sets (the MMD / COV / 1-NNA metrics, the
view classifier's test set) other seeds.

Captions (`caption`): "a [size] [aspect] [color] shape", where the size/aspect words of a non-middle
value each appear with probability `attribute_rate` (else the attribute is left unspecified), and with
probability `caption_noise` the shape word names a uniformly random primitive instead of the true one —
web captions are often wrong, and a model trained on them follows its prompt only in part.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin
from diffalign.modalities.shape3d.conditioning import SHAPE_PROMPTS, SHAPES, parse_condition, prompt_text
from diffalign.modalities.shape3d.primitives import ShapeSpec, aspect_word, make_shape, random_spec, size_word

#: seeds of the generated sets (never overlap: the training set is never evaluated on)
TRAIN_SEED, REFERENCE_SEED, CLASSIFIER_SEED, CLASSIFIER_TEST_SEED = 0, 1, 2, 3


@dataclass
class ShapeSet:
    """Padded point clouds and what they are.

    Attributes:
        points: (M, N, 3) float, zero beyond each cloud's count.
        mask: (M, N) float, 1 on real points.
        colors: (M, N, 3) in [0, 1] (zero on padding) or None.
        specs: the `ShapeSpec` of each cloud.
    """

    points: Tensor
    mask: Tensor
    colors: Tensor | None
    specs: list[ShapeSpec]

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def labels(self) -> Tensor:
        """Shape class ids (M,)."""
        return torch.tensor([SHAPES.index(s.shape) for s in self.specs], dtype=torch.long)

    def layout(self, rows: Any = slice(None)) -> dict[str, Tensor]:
        """The sample layout of rows (`{"points", "mask"[, "colors"]}`)."""
        out = {"points": self.points[rows], "mask": self.mask[rows]}
        if self.colors is not None:
            out["colors"] = self.colors[rows]
        return out


def _generate(
    count: int,
    seed: int,
    min_points: int,
    max_points: int,
    tilt_probability: float,
    colors: bool,
    shape: str | None,
) -> ShapeSet:
    if not 1 <= min_points <= max_points:
        raise ValueError(f"need 1 <= min_points <= max_points, got {min_points}, {max_points}")
    rng = np.random.default_rng(seed)
    pts = np.zeros((count, max_points, 3), dtype=np.float32)
    cols = np.zeros((count, max_points, 3), dtype=np.float32) if colors else None
    mask = np.zeros((count, max_points), dtype=np.float32)
    specs = []
    for i in range(count):
        spec = random_spec(rng, shape, tilt_probability, colors)
        n = int(rng.integers(min_points, max_points + 1))
        p, c = make_shape(spec, n, rng)
        pts[i, :n], mask[i, :n] = p, 1.0
        if cols is not None:
            cols[i, :n] = c
        specs.append(spec)
    return ShapeSet(
        torch.from_numpy(pts), torch.from_numpy(mask), None if cols is None else torch.from_numpy(cols), specs
    )


@lru_cache(maxsize=8)
def _cached(*args: Any) -> ShapeSet:
    return _generate(*args)


def make_dataset(
    count: int,
    seed: int = TRAIN_SEED,
    min_points: int = 64,
    max_points: int = 96,
    tilt_probability: float = 0.3,
    colors: bool = False,
    shape: str | None = None,
) -> ShapeSet:
    """`count` random primitives (of one `shape` if given) as a `ShapeSet` (cached per process; do not
    modify the returned tensors)."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return _cached(count, seed, min_points, max_points, tilt_probability, colors, shape)


def reference_set(
    prompt: Any, count: int, seed: int = REFERENCE_SEED, min_points: int = 64, max_points: int = 96, **kw: Any
) -> ShapeSet:
    """Held-out shapes of the primitive a prompt names (other attributes drawn at random): what generated
    samples of that prompt are compared with (MMD / COV / 1-NNA)."""
    shape = parse_condition(prompt).shape
    if shape is None:
        raise ValueError(f"reference_set: condition {prompt!r} names no shape")
    return make_dataset(
        count, seed + 1000 * (1 + SHAPES.index(shape)), min_points, max_points, shape=shape, **kw
    )


def caption(
    spec: ShapeSpec, rng: np.random.Generator, caption_noise: float = 0.0, attribute_rate: float = 0.8
) -> str:
    """A training caption of a spec (see the module docstring); draws from `rng` in a fixed order."""
    noisy, random_shape = rng.uniform(), SHAPES[int(rng.integers(len(SHAPES)))]
    keep_aspect, keep_size, keep_color = rng.uniform(), rng.uniform(), rng.uniform()
    shape = random_shape if noisy < caption_noise else spec.shape
    aspect = aspect_word(spec) if keep_aspect < attribute_rate else None
    size = size_word(spec) if keep_size < attribute_rate else None
    color = spec.color if keep_color < attribute_rate else None
    return prompt_text(shape, aspect, size, color)


def captions(
    specs: list[ShapeSpec], seed: int, caption_noise: float = 0.0, attribute_rate: float = 0.8
) -> list[str]:
    """One fixed caption per spec (seeded)."""
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
    rng = np.random.default_rng(seed)
    return [caption(s, rng, caption_noise, attribute_rate) for s in specs]


class _Rows(Dataset):
    def __init__(self, shapes: ShapeSet, texts: list[str]) -> None:
        self.shapes, self.texts = shapes, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> int:
        return i


class ShapesDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Generated primitives for pretraining a shape model.

    Batches are `{"sample": {"points": (B, N, 3), "mask": (B, N)[, "colors": (B, N, 3)]}, "prompt": [...]}`
    (the sample layout, padded). The evaluation set is `SHAPE_PROMPTS` (one prompt per primitive) ×
    `eval_seeds_per_prompt` seeds.

    Args:
        num_shapes: size of the generated training set (seed `TRAIN_SEED`).
        min_points, max_points: point counts (uniform per shape).
        tilt_probability: share of boxes, cylinders, cones and capsules that are tilted.
        colors: give each shape a colour (and its word in the caption).
        caption_noise: share of captions whose shape word names a random primitive.
        attribute_rate: probability that a caption names a shape's non-middle aspect / size / colour.
        batch_size, batches_per_epoch: batches per epoch, drawn in a per-epoch seeded order.
        seed: order and caption seed.
        eval_seeds_per_prompt, eval_seed: the fixed evaluation set.
    """

    def __init__(
        self,
        num_shapes: int = 6000,
        min_points: int = 64,
        max_points: int = 96,
        tilt_probability: float = 0.3,
        colors: bool = False,
        caption_noise: float = 0.0,
        attribute_rate: float = 0.8,
        batch_size: int = 64,
        batches_per_epoch: int = 50,
        seed: int = 0,
        eval_seeds_per_prompt: int = 16,
        eval_seed: int = 10_000,
    ) -> None:
        super().__init__()
        self.shapes = make_dataset(num_shapes, TRAIN_SEED, min_points, max_points, tilt_probability, colors)
        self.texts = captions(self.shapes.specs, seed, caption_noise, attribute_rate)
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.eval_prompts = list(SHAPE_PROMPTS)
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def _collate(self, rows: list[int]) -> dict[str, Any]:
        idx = torch.tensor(rows, dtype=torch.long)
        return {"sample": self.shapes.layout(idx), "prompt": [self.texts[i] for i in rows]}

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.texts), self.batch_size * self.batches_per_epoch, self.seed, replacement=False
        )
        return DataLoader(
            _Rows(self.shapes, self.texts),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collate,
        )
