"""Shape modality: point-cloud diffusion over primitive shapes sampled with trimesh.

Model space (B, N, 3 [+ 3 colour]) with a mask (B, N) of real points; sample layout a dict
`{"points": (B, N, 3), "mask": (B, N)[, "colors"][, "images": (B, V, C, H, W)]}` (see `backbone`).
Conditions: prompt strings ("a tall cylinder"), shape ids or attribute dicts (`conditioning`). Geometry
(chamfer, kNN) and the soft point-splatting renderer are pure torch, using pytorch3d where installed.
"""

from diffalign.core.extras import require

require("trimesh", "shape3d", "diffalign.modalities.shape3d")

from diffalign.modalities.shape3d.backbone import FLOW_BASE_WEIGHTS, ShapeBackbone  # noqa: E402
from diffalign.modalities.shape3d.conditioning import (  # noqa: E402
    SHAPE_PROMPTS,
    SHAPES,
    ShapeCondition,
    parse_condition,
    prompt_text,
    prompted_shapes,
)
from diffalign.modalities.shape3d.data import ShapesDataModule, ShapeSet, make_dataset, reference_set  # noqa: E402
from diffalign.modalities.shape3d.geometry import chamfer_distance, have_pytorch3d, knn, pairwise_chamfer  # noqa: E402
from diffalign.modalities.shape3d.render import VIEW_SETS, Camera, parse_views, render_points  # noqa: E402

__all__ = [
    "FLOW_BASE_WEIGHTS",
    "SHAPES",
    "SHAPE_PROMPTS",
    "VIEW_SETS",
    "Camera",
    "ShapeBackbone",
    "ShapeCondition",
    "ShapeSet",
    "ShapesDataModule",
    "chamfer_distance",
    "have_pytorch3d",
    "knn",
    "make_dataset",
    "pairwise_chamfer",
    "parse_condition",
    "parse_views",
    "prompt_text",
    "prompted_shapes",
    "reference_set",
    "render_points",
]
