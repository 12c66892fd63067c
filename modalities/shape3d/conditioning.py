"""Conditions of the shape modality: a prompt grammar over primitive attributes, parsed offline.

A condition names up to four attributes of a primitive: its `shape` (box, sphere, cylinder, cone, torus,
capsule), `aspect` (flat or tall), `size` (small or large) and `color` (red, green, blue, yellow; only
for colour models). Each attribute has id 0 for "unspecified": a model trained with attribute words left
out of some captions draws its own value then, and all-zero ids are the null condition for
classifier-free guidance.

Accepted conditions (`parse_condition`):
- a prompt string: "a tall cylinder", "a small flat red box", "a ball" (words are lower-cased; synonyms
  map to attributes, see `SYNONYMS`; other words such as "a", "shape" are ignored; a string naming no
  attribute is unconditional);
- an int: a shape id (0 = box … 5 = capsule, the order of `SHAPES`);
- a dict: `{"shape": "cylinder", "aspect": "tall", "size": "small", "color": "red", "num_points": 100}`
  (every key optional; values are names or their index in the attribute's values, e.g. shape 2 =
  cylinder; None leaves one unspecified; `num_points` fixes the point count of that sample).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: the primitives, in class-id order (the view classifier's classes)
SHAPES: tuple[str, ...] = ("box", "sphere", "cylinder", "cone", "torus", "capsule")
ASPECTS: tuple[str, ...] = ("flat", "tall")
SIZES: tuple[str, ...] = ("small", "large")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
#: attribute -> its values; a value's condition id is its index + 1 (0 = unspecified)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "aspect": ASPECTS, "size": SIZES, "color": COLORS}
#: RGB in [0, 1] of each colour word
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.9, 0.8, 0.1),
}
#: words of a prompt string -> (attribute, value)
SYNONYMS: dict[str, tuple[str, str]] = {
    **{w: ("shape", "box") for w in ("box", "cube", "block", "cuboid")},
    **{w: ("shape", "sphere") for w in ("sphere", "ball", "ellipsoid", "globe")},
    **{w: ("shape", "cylinder") for w in ("cylinder", "tube", "can", "drum")},
    **{w: ("shape", "cone") for w in ("cone",)},
    **{w: ("shape", "torus") for w in ("torus", "ring", "donut", "doughnut")},
    **{w: ("shape", "capsule") for w in ("capsule", "pill")},
    **{w: ("aspect", "flat") for w in ("flat", "squat", "short")},
    **{w: ("aspect", "tall") for w in ("tall", "elongated", "long")},
    **{w: ("size", "small") for w in ("small", "tiny", "little")},
    **{w: ("size", "large") for w in ("large", "big", "huge")},
    **{w: ("color", w) for w in COLORS},
}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ShapeCondition:
    """Parsed condition: attribute names (None = unspecified) and an optional point count."""

    shape: str | None = None
    aspect: str | None = None
    size: str | None = None
    color: str | None = None
    num_points: int = 0  # 0: the backbone draws the count

    def ids(self) -> dict[str, int]:
        """Condition ids per attribute (0 = unspecified)."""
        return {
            a: 0 if getattr(self, a) is None else ATTRIBUTES[a].index(getattr(self, a)) + 1
            for a in ATTRIBUTES
        }


def prompt_text(
    shape: str, aspect: str | None = None, size: str | None = None, color: str | None = None
) -> str:
    """The canonical prompt of a condition: "a [size] [aspect] [color] shape" ("a small tall cylinder")."""
    words = [w for w in (size, aspect, color) if w] + [shape]
    return "a " + " ".join(words)


def _value(attribute: str, value: Any, where: str) -> str | None:
    values = ATTRIBUTES[attribute]
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(values):
            raise ValueError(f"{where}: {attribute} id {value} is outside 0..{len(values) - 1} ({values})")
        return values[value]
    name = str(value).lower()
    if name in values:
        return name
    if name in SYNONYMS and SYNONYMS[name][0] == attribute:
        return SYNONYMS[name][1]
    raise ValueError(f"{where}: unknown {attribute} {value!r}; known: {', '.join(values)}")


def parse_condition(condition: Any) -> ShapeCondition:
    """A prompt string, shape id or attribute dict as a `ShapeCondition` (see the module docstring)."""
    if isinstance(condition, ShapeCondition):
        return condition
    if isinstance(condition, Mapping):
        unknown = set(condition) - {*ATTRIBUTES, "num_points", "prompt"}
        if unknown:
            raise ValueError(
                f"shape condition {dict(condition)}: unknown keys {sorted(unknown)} "
                f"(known: {', '.join([*ATTRIBUTES, 'num_points'])})"
            )
        if "prompt" in condition:  # a prompt string with overrides
            base = parse_condition(str(condition["prompt"]))
            fields = {a: getattr(base, a) for a in ATTRIBUTES}
        else:
            fields = {}
        for a in ATTRIBUTES:
            if a in condition:
                fields[a] = _value(a, condition[a], f"shape condition {dict(condition)}")
        n = condition.get("num_points", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"shape condition {dict(condition)}: num_points must be an int >= 0, got {n!r}")
        return ShapeCondition(**fields, num_points=n)
    if isinstance(condition, bool):
        raise TypeError(f"a shape condition cannot be a bool ({condition!r})")
    if isinstance(condition, int):
        return ShapeCondition(shape=_value("shape", condition, "shape condition"))
    if isinstance(condition, str):
        found: dict[str, str] = {}
        for w in _WORD.findall(condition.lower()):
            if w in SYNONYMS:
                attribute, value = SYNONYMS[w]
                found.setdefault(attribute, value)  # the first word of an attribute wins
        return ShapeCondition(**found)
    raise TypeError(
        f"a shape condition is a prompt string, a shape id or a dict, got {type(condition).__name__}"
    )


def condition_ids(conditions: Sequence[Any]) -> dict[str, Tensor]:
    """Long tensors (B,) of attribute ids and `num_points` for a list of conditions."""
    parsed = [parse_condition(c) for c in conditions]
    out = {a: torch.tensor([p.ids()[a] for p in parsed], dtype=torch.long) for a in ATTRIBUTES}
    out["num_points"] = torch.tensor([p.num_points for p in parsed], dtype=torch.long)
    return out


def prompted_shapes(prompts: Any, batch_size: int, who: str = "reward") -> Tensor:
    """The shape class id (B,) each row's condition asks for; raises naming rows that ask for none."""
    if prompts is None:
        raise ValueError(
            f"{who} needs the conditions of the shapes it scores (cond['prompt']: strings such as "
            "'a tall cylinder', shape ids or dicts with 'shape')"
        )
    if isinstance(prompts, Tensor):
        ids = prompts.reshape(-1).long()
    elif isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
        raise TypeError(f"{who}: prompts must be a list (one per sample), got {type(prompts).__name__}")
    else:
        parsed = [parse_condition(p) for p in prompts]
        bad = [p for p, c in zip(prompts, parsed, strict=True) if c.shape is None]
        if bad:
            raise ValueError(
                f"{who}: every condition must name a shape ({', '.join(SHAPES)}); these do not: {bad[:3]}"
            )
        ids = torch.tensor([SHAPES.index(c.shape) for c in parsed], dtype=torch.long)
    if ids.numel() != batch_size:
        raise ValueError(f"{who}: got {ids.numel()} conditions for {batch_size} samples")
    if ((ids < 0) | (ids >= len(SHAPES))).any():
        raise ValueError(f"{who}: shape ids must be in 0..{len(SHAPES) - 1}, got {ids.tolist()}")
    return ids


#: the alignment and evaluation prompts of the recipes: one per primitive
SHAPE_PROMPTS: tuple[str, ...] = tuple(prompt_text(s) for s in SHAPES)
