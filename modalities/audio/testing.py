"""Tiny audio backbones built in code (random weights) for contract tests: a few thousand parameters,
clips of two notes at most, a handful of Griffin–Lim iterations."""

from __future__ import annotations

from typing import Any

from diffalign.modalities.audio.backbone import MelBackbone, WaveformBackbone

TINY_MEL: dict[str, Any] = {
    "note_samples": 512,
    "max_notes": 2,
    "n_mels": 8,
    "griffin_lim_iters": 4,
    "block_out_channels": (8, 16),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "embed_dim": 8,
    "roll_channels": 2,
}
TINY_WAVE: dict[str, Any] = {
    "note_samples": 256,
    "max_notes": 2,
    "block_out_channels": (8, 8, 32),
    "embed_dim": 8,
    "cond_channels": 4,
}


def tiny_mel_backbone(**overrides: Any) -> MelBackbone:
    """A random-weight `MelBackbone`: 8 mel bands, notes of 512 samples (4 frames), two notes at most."""
    return MelBackbone(**{**TINY_MEL, **overrides, "weights": None})


def tiny_wave_backbone(**overrides: Any) -> WaveformBackbone:
    """A random-weight `WaveformBackbone`: notes of 256 samples, two notes at most."""
    return WaveformBackbone(**{**TINY_WAVE, **overrides, "weights": None})
