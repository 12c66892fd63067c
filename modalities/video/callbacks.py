"""Pictures of a video run: the same prompts and seeds sampled before training and at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from diffalign.core.callbacks import run_dir
from diffalign.modalities.video.data import EVAL_PROMPTS
from diffalign.modalities.video.gifs import write_clip_pictures

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_clips(module: Any, prompts: list[Any], seeds: list[int], batch_size: int = 32) -> Tensor:
    """Decoded clips (N, F, 3, H, W) in [0, 1] of `module.policy`, one per (prompt, seed), through the one
    sampling path (`core.sampling.sample_pairs`)."""
    from diffalign.core.sampling import sample_pairs

    policy = module.policy
    was_training = policy.training
    policy.eval()
    try:
        pairs = list(zip(prompts, seeds, strict=True))
        batches = sample_pairs(policy, pairs, batch_size=batch_size)
        return torch.cat([b.samples().detach().float().cpu().clamp(0, 1) for b in batches])
    finally:
        policy.train(was_training)


class ClipGrid(Callback):
    """Writes `samples_before.gif` / `.png` (at fit start) and `samples_after.gif` / `.png` (at fit end)
    into the run folder: an animated grid (one row per prompt, one clip per seed, all playing in step) and
    its contact sheet (one line of frames per clip). Before and after use the same prompts and seeds, so
    they compare directly. A resumed run keeps the first run's "before" pictures.

    Args:
        prompts: one grid row per prompt (default: the 16 evaluation prompts `EVAL_PROMPTS`).
        seeds_per_prompt: clips per row.
        seed: first seed (clip j of every row uses seed + j).
        scale: pixel upscaling of the GIF tiles (the contact sheet uses half).
    """

    def __init__(
        self, prompts: list[Any] | None = None, seeds_per_prompt: int = 4, seed: int = 20_000, scale: int = 4
    ) -> None:
        self.prompts = list(prompts) if prompts else list(EVAL_PROMPTS)
        self.seeds_per_prompt, self.seed, self.scale = seeds_per_prompt, seed, scale

    def _write(self, trainer: L.Trainer, pl_module: Any, tag: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        folder = run_dir(trainer)
        if tag == "before" and (folder / "samples_before.gif").exists():
            return folder / "samples_before.gif"
        prompts = [p for p in self.prompts for _ in range(self.seeds_per_prompt)]
        seeds = [self.seed + j for _ in self.prompts for j in range(self.seeds_per_prompt)]
        ema = getattr(pl_module, "ema_weights", None) if tag == "after" else None
        if ema is not None:
            with ema():
                clips = sample_clips(pl_module, prompts, seeds)
        else:
            clips = sample_clips(pl_module, prompts, seeds)
        k = self.seeds_per_prompt
        rows = [(str(p), clips[i * k : (i + 1) * k]) for i, p in enumerate(self.prompts)]
        title = f"{tag} training (step {trainer.global_step})"
        gif, png = write_clip_pictures(rows, folder, f"samples_{tag}", title, self.scale)
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "add_image"):
                import numpy as np
                from PIL import Image

                sheet = np.asarray(Image.open(png).convert("RGB")).transpose(2, 0, 1)
                experiment.add_image(f"samples/{tag}", sheet, global_step=trainer.global_step)
        log.info("wrote %s and %s", gif, png)
        return gif

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module, "before")

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        after = self._write(trainer, pl_module, "after")
        if after is not None:
            before = after.with_name("samples_before.gif")
            print(f"clip grids (same prompts and seeds): {before}  {after} (+ .png contact sheets)")
