"""Tiny video backbones built in code (random weights) for contract tests."""

from __future__ import annotations

from typing import Any

from diffalign.modalities.video.backbone import VideoBackbone

#: 4 frames of 8×8, two levels of width 8 and 16: about 40 k parameters
TINY_CONFIG: dict[str, Any] = {
    "num_frames": 4,
    "sample_size": 8,
    "channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}


def tiny_video_backbone(**overrides: Any) -> VideoBackbone:
    """A random-weight `VideoBackbone` of `TINY_CONFIG` (overrides win), ε prediction unless told."""
    cfg = {"prediction_type": "epsilon", **TINY_CONFIG, **overrides}
    return VideoBackbone(**cfg, weights=None)
