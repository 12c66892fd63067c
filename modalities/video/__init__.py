"""Video modality: a pixel-space diffusers UNet3D over short clips, and moving handwritten digits.

Model space: (B, C, F, H, W) in [−1, 1]. Sample layout (what `decode` returns, what video rewards take):
float (B, F', 3, H, W) in [0, 1], RGB frames, F' the frames a reward's request selects
(`frames.frame_indices`). Conditions: a digit, a direction and a speed, as text ("a 3 moving left,
fast") or a dict (`{"digit": 3, "direction": "left", "speed": "fast"}`), parsed by
`conditions.parse_condition` (rewards use the same parser). `WanBackbone` runs the same recipes on a
Wan 2.1 text-to-video pipeline from a local diffusers folder.
"""

from diffalign.modalities.video.backbone import (
    FLOW_BASE_WEIGHTS,
    MOVING_DIGITS_CONFIG,
    VideoBackbone,
    from_clip_layout,
    moving_digits_backbone,
    to_clip_layout,
)
from diffalign.modalities.video.conditioner import MotionConditioner
from diffalign.modalities.video.conditions import (
    DIRECTIONS,
    SPEED_PIXELS,
    SPEEDS,
    MotionCondition,
    motion_prompt,
    parse_condition,
    parse_conditions,
)
from diffalign.modalities.video.data import (
    ALL_PROMPTS,
    COM_WALLS,
    EVAL_PROMPTS,
    MovingDigitsDataModule,
    load_digits_8x8,
)
from diffalign.modalities.video.frames import frame_indices

_LAZY = {  # the Wan pipeline pulls in transformers: imported on first use only
    "WanBackbone": "diffalign.modalities.video.wan",
    "save_tiny_wan_pipeline": "diffalign.modalities.video.wan",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign.modalities.video' has no attribute {name!r}")


__all__ = [
    "ALL_PROMPTS",
    "COM_WALLS",
    "DIRECTIONS",
    "EVAL_PROMPTS",
    "FLOW_BASE_WEIGHTS",
    "MOVING_DIGITS_CONFIG",
    "MotionCondition",
    "MotionConditioner",
    "MovingDigitsDataModule",
    "SPEEDS",
    "SPEED_PIXELS",
    "VideoBackbone",
    "WanBackbone",
    "frame_indices",
    "from_clip_layout",
    "load_digits_8x8",
    "motion_prompt",
    "moving_digits_backbone",
    "parse_condition",
    "parse_conditions",
    "save_tiny_wan_pipeline",
    "to_clip_layout",
]
