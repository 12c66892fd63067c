"""Pictures of a run: the same prompts and seeds sampled before training and at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from diffalign.core.callbacks import run_dir
from diffalign.modalities.image.conditioning import DIGIT_PROMPTS
from diffalign.modalities.image.grids import image_grid

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_images(module: Any, prompts: list[str], seeds: list[int]) -> Tensor:
    """Decoded samples (N, 3, H, W) in [0, 1] of `module.policy`, one per (prompt, seed)."""
    policy = module.policy
    was_training = policy.training
    policy.eval()
    try:
        from diffalign.core.sampling import sample_pairs

        batches = sample_pairs(policy, list(zip(prompts, seeds, strict=True)), batch_size=len(prompts))
        return torch.cat([b.samples().detach().float().cpu().clamp(0, 1) for b in batches])
    finally:
        policy.train(was_training)


class SampleGrid(Callback):
    """Writes `samples_before.png` (at fit start) and `samples_after.png` (at fit end) into the run folder.

    Both grids sample the same prompts (one row each) with the same seeds (one column each), so they
    compare directly. They are also logged to TensorBoard (`samples/before`, `samples/after`) when a
    TensorBoard logger is attached. A resumed run keeps the first run's `samples_before.png`.

    Args:
        prompts: one grid row per prompt (default: the 10 digit prompts).
        seeds_per_prompt: columns.
        seed: first seed (column j uses seed + j).
        scale: pixel upscaling of each tile.
    """

    def __init__(
        self, prompts: list[str] | None = None, seeds_per_prompt: int = 8, seed: int = 20_000, scale: int = 4
    ) -> None:
        self.prompts = list(prompts) if prompts else list(DIGIT_PROMPTS)
        self.seeds_per_prompt, self.seed, self.scale = seeds_per_prompt, seed, scale

    def _write(self, trainer: L.Trainer, pl_module: Any, tag: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        path = run_dir(trainer) / f"samples_{tag}.png"
        if tag == "before" and path.exists():
            return path
        prompts = [p for p in self.prompts for _ in range(self.seeds_per_prompt)]
        seeds = [self.seed + j for _ in self.prompts for j in range(self.seeds_per_prompt)]
        ema = getattr(pl_module, "ema_weights", None) if tag == "after" else None
        if ema is not None:
            with ema():
                images = sample_images(pl_module, prompts, seeds)
        else:
            images = sample_images(pl_module, prompts, seeds)
        title = f"{tag} training (step {trainer.global_step})"
        grid = image_grid(images, self.seeds_per_prompt, self.prompts, self.scale, title)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "add_image"):
                import numpy as np

                experiment.add_image(
                    f"samples/{tag}", np.asarray(grid).transpose(2, 0, 1), global_step=trainer.global_step
                )
        log.info("wrote %s", path)
        return path

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module, "before")

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        after = self._write(trainer, pl_module, "after")
        if after is not None:
            print(f"sample grids (same prompts and seeds): {after.with_name('samples_before.png')}  {after}")
