"""What a shape run leaves in its folder: pictures and PLYs of fixed samples, and the field's metrics,
both before training and at the end, on the same (prompt, seed) pairs.

- `ShapeSamples`: `samples_before.png` / `samples_after.png` (rendered views, one row per prompt, the
  same seeds before and after) and `shapes_before/`, `shapes_after/` with one PLY per sample.
- `ShapeMetrics`: MMD-CD, COV-CD and 1-NNA-CD of samples of each prompt against held-out primitives of
  the shape it names (`data.reference_set`), before and after; writes `shape_metrics.json` and logs
  `shape/<metric>_<before|after>`. A reward gain bought by collapsing onto a few shapes shows up as a
  COV drop and a 1-NNA rise.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from diffalign.core.callbacks import run_dir
from diffalign.modalities.shape3d.conditioning import SHAPE_PROMPTS

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_layouts(
    policy: Any, pairs: list[tuple[Any, int]], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """The decoded samples (sample layout, concatenated, on the CPU) of fixed (prompt, seed) pairs."""
    from diffalign.core.sampling import sample_pairs

    was_training = policy.training
    policy.eval()
    try:
        parts = [b.samples() for b in sample_pairs(policy, pairs, batch_size)]
    finally:
        policy.train(was_training)
    return {k: torch.cat([p[k].detach().cpu() for p in parts]) for k in parts[0]}


def _after(pl_module: Any, tag: str):
    ema = getattr(pl_module, "ema_weights", None) if tag == "after" else None
    return ema() if ema is not None else contextlib.nullcontext()


class ShapeSamples(Callback):
    """Pictures and PLY files of the same prompts and seeds at fit start and fit end.

    Args:
        prompts: one grid row per prompt (default: one per primitive, `SHAPE_PROMPTS`).
        seeds_per_prompt: samples per prompt (seed + j for the j-th).
        seed: first seed.
        views: cameras of each tile (`render.parse_views`).
        image_size: pixels per view.
    """

    def __init__(
        self,
        prompts: list[Any] | None = None,
        seeds_per_prompt: int = 4,
        seed: int = 20_000,
        views: Any = "pair",
        image_size: int = 64,
    ) -> None:
        self.prompts = list(prompts) if prompts else list(SHAPE_PROMPTS)
        self.seeds_per_prompt, self.seed, self.views, self.image_size = (
            seeds_per_prompt,
            seed,
            views,
            image_size,
        )

    def write(self, trainer: L.Trainer, pl_module: Any, tag: str) -> Path | None:
        from diffalign.modalities.shape3d.grids import labelled_grid, prompt_rows, render_tiles
        from diffalign.modalities.shape3d.io import write_samples

        if not trainer.is_global_zero:
            return None
        folder = run_dir(trainer)
        path = folder / f"samples_{tag}.png"
        if tag == "before" and path.exists():  # a resumed run keeps the first run's pictures
            return path
        pairs = [(p, self.seed + j) for p in self.prompts for j in range(self.seeds_per_prompt)]
        with _after(pl_module, tag):
            samples = sample_layouts(pl_module.policy, pairs)
        write_samples(samples, folder / f"shapes_{tag}")
        tiles = render_tiles(samples, self.views, self.image_size)
        last = self.seed + self.seeds_per_prompt - 1
        title = f"{tag} training (step {trainer.global_step}); seeds {self.seed}..{last}"
        grid = labelled_grid(prompt_rows(tiles, [p for p, _ in pairs]), title)
        folder.mkdir(parents=True, exist_ok=True)
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
        self.write(trainer, pl_module, "before")

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        after = self.write(trainer, pl_module, "after")
        if after is not None:
            print(f"shape samples (same prompts and seeds): {after.with_name('samples_before.png')}  {after}")


class ShapeMetrics(Callback):
    """MMD-CD / COV-CD / 1-NNA-CD before and after training (see the module docstring).

    For each prompt, `samples_per_prompt` samples (seeds `seed + 1000·i + j`, the seeding rule) are
    compared with `reference_per_prompt` held-out primitives of the shape the prompt names; the
    summary averages the prompts.

    Args:
        prompts: conditions naming a primitive (default `SHAPE_PROMPTS`).
        samples_per_prompt, reference_per_prompt: set sizes per prompt.
        seed: first seed of the samples.
        batch_size: rows sampled at once.
    """

    def __init__(
        self,
        prompts: list[Any] | None = None,
        samples_per_prompt: int = 32,
        reference_per_prompt: int = 32,
        seed: int = 30_000,
        batch_size: int = 64,
    ) -> None:
        self.prompts = list(prompts) if prompts else list(SHAPE_PROMPTS)
        self.samples_per_prompt, self.reference_per_prompt = samples_per_prompt, reference_per_prompt
        self.seed, self.batch_size = seed, batch_size
        self.before: dict[str, Any] | None = None

    def measure(self, pl_module: Any) -> dict[str, Any]:
        """The metrics of the module's policy now: per prompt and their mean."""
        from diffalign.core.sampling import seed_pairs
        from diffalign.modalities.shape3d.data import reference_set
        from diffalign.modalities.shape3d.metrics import shape_metrics

        backbone = pl_module.policy.backbone
        pairs = seed_pairs(self.prompts, self.samples_per_prompt, self.seed)
        samples = sample_layouts(pl_module.policy, pairs, self.batch_size)
        per_prompt = {}
        for i, prompt in enumerate(self.prompts):
            rows = slice(i * self.samples_per_prompt, (i + 1) * self.samples_per_prompt)
            ref = reference_set(
                prompt,
                self.reference_per_prompt,
                min_points=backbone.min_points,
                max_points=backbone.max_points,
            )
            per_prompt[str(prompt)] = shape_metrics(
                samples["points"][rows], samples["mask"][rows], ref.points, ref.mask
            )
        keys = ("mmd_cd", "cov_cd", "nna_cd")
        mean = {k: sum(m[k] for m in per_prompt.values()) / len(per_prompt) for k in keys}
        return {**mean, "per_prompt": per_prompt}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.before is None:
            self.before = self.measure(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        from diffalign.core.io import write_json

        with _after(pl_module, "after"):
            after = self.measure(pl_module)
        before = self.before or {}
        out = {
            "before": before,
            "after": after,
            "samples_per_prompt": self.samples_per_prompt,
            "reference_per_prompt": self.reference_per_prompt,
        }
        write_json(run_dir(trainer) / "shape_metrics.json", out)
        for lg in trainer.loggers:
            lg.log_metrics(
                {
                    f"shape/{k}_{tag}": v[k]
                    for tag, v in (("before", before), ("after", after))
                    for k in ("mmd_cd", "cov_cd", "nna_cd")
                    if k in v
                },
                step=trainer.global_step,
            )
        line = ", ".join(
            f"{k} {before.get(k, float('nan')):.4f} -> {after[k]:.4f}" for k in ("mmd_cd", "cov_cd", "nna_cd")
        )
        print(f"shape metrics vs held-out primitives: {line}  ({run_dir(trainer) / 'shape_metrics.json'})")

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("before")
