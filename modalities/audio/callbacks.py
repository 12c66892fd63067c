"""What a run leaves to listen to and look at: the same prompts and seeds sampled before training and at
the end, as WAV files and as spectrogram grids in the run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from diffalign.core.callbacks import run_dir
from diffalign.modalities.audio.data import note_prompts
from diffalign.modalities.audio.io import save_spectrogram_grid, write_wav
from diffalign.modalities.audio.layout import AudioSamples

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_audio(module: Any, prompts: list[Any], seeds: list[int], batch_size: int = 32) -> AudioSamples:
    """Decoded clips of `module.policy`, one per (prompt, seed), through the one sampling path."""
    from diffalign.core.sampling import sample_pairs

    policy = module.policy
    was_training = policy.training
    policy.eval()
    try:
        batches = sample_pairs(policy, list(zip(prompts, seeds, strict=True)), batch_size=batch_size)
        return AudioSamples.cat([b.samples().detach().to("cpu") for b in batches])
    finally:
        policy.train(was_training)


class SampleSpectrograms(Callback):
    """Writes, into the run folder, `spectrograms_before.png` + `wav_before/` at fit start and
    `spectrograms_after.png` + `wav_after/` at fit end.

    Both sample the same prompts (one grid row each) with the same seeds (one tile each), so they compare
    directly; WAV `<row>_<column>.wav` is the clip of row (prompt) and column (seed). The grids are also
    logged to TensorBoard (`spectrograms/before`, `/after`) when a TensorBoard logger is attached. A
    resumed run keeps the first run's "before" files.

    Args:
        prompts: one row per prompt (default: the 8 notes as sine tones, `note_prompts(["sine"])`).
        seeds_per_prompt: columns.
        seed: first seed (column j uses seed + j).
    """

    def __init__(
        self, prompts: list[Any] | None = None, seeds_per_prompt: int = 4, seed: int = 20_000
    ) -> None:
        self.prompts = list(prompts) if prompts else note_prompts(["sine"])
        self.seeds_per_prompt, self.seed = seeds_per_prompt, seed

    def _write(self, trainer: L.Trainer, pl_module: Any, tag: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        folder = run_dir(trainer)
        path = folder / f"spectrograms_{tag}.png"
        if tag == "before" and path.exists():
            return path
        prompts = [p for p in self.prompts for _ in range(self.seeds_per_prompt)]
        seeds = [self.seed + j for _ in self.prompts for j in range(self.seeds_per_prompt)]
        ema = getattr(pl_module, "ema_weights", None) if tag == "after" else None
        if ema is not None:
            with ema():
                samples = sample_audio(pl_module, prompts, seeds)
        else:
            samples = sample_audio(pl_module, prompts, seeds)
        wavs = folder / f"wav_{tag}"
        for i in range(len(samples)):
            row, column = divmod(i, self.seeds_per_prompt)
            write_wav(wavs / f"{row:03d}_{column:02d}.wav", samples.clip(i), samples.sample_rate)
        labels = [str(p) for p in self.prompts]
        title = f"{tag} training (step {trainer.global_step}), {samples.sample_rate} Hz"
        save_spectrogram_grid(samples, self.seeds_per_prompt, labels, path, title)
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "add_image"):
                import numpy as np
                from PIL import Image

                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
                experiment.add_image(f"spectrograms/{tag}", arr, global_step=trainer.global_step)
        log.info("wrote %s and %s", path, wavs)
        return path

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, pl_module, "before")

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        after = self._write(trainer, pl_module, "after")
        if after is not None:
            before = after.with_name("spectrograms_before.png")
            wavs = f"{after.parent / 'wav_before'} and {after.parent / 'wav_after'}"
            print(f"spectrograms (same prompts and seeds): {before}  {after}; WAVs in {wavs}")
