"""A tiny shape backbone built in code (random weights) for contract tests and recipe smoke runs."""

from __future__ import annotations

from typing import Any

from diffalign.modalities.shape3d.backbone import ShapeBackbone

TINY_CONFIG: dict[str, Any] = {"max_points": 12, "min_points": 6, "width": 16, "depth": 1, "heads": 2}


def tiny_shape_backbone(**overrides: Any) -> ShapeBackbone:
    """A random-weight `ShapeBackbone` of a few thousand parameters with 6–12 points per cloud. The layers
    a real model starts at zero (adaLN-Zero modulation, output projection) are re-initialised at random,
    so the untrained denoiser mixes its points through attention and contract checks mean something."""
    import torch

    backbone = ShapeBackbone(**{**TINY_CONFIG, "weights": None, **overrides})
    g = torch.Generator().manual_seed(0)
    net = backbone.net
    zero_init = [net.output, net.final] + [b.modulation for b in net.blocks]
    with torch.no_grad():
        for layer in zero_init:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
    return backbone
