"""A tiny shape backbone built in code (random weights) for contract tests and recipe smoke runs."""

from __future__ import annotations

from typing import Any

from diffalign.modalities.shape3d.backbone import ShapeBackbone

TINY_CONFIG: dict[str, Any] = {"max_points": 12, "min_points": 6, "width": 16, "depth": 1, "heads": 2}


def tiny_shape_backbone(**overrides: Any) -> ShapeBackbone:
    """A random-weight `ShapeBackbone` of a few thousand parameters with 6–12 points per cloud. Its output
    projection is re-initialised at random (the real one starts at zero), so the untrained denoiser's
    output depends on its input and contract checks mean something."""
    import torch

    backbone = ShapeBackbone(**{**TINY_CONFIG, "weights": None, **overrides})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        backbone.net.output.weight.copy_(torch.randn(backbone.net.output.weight.shape, generator=g) * 0.2)
    return backbone
