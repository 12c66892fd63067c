"""What a moving-digit clip is asked for: a digit, a direction and a speed — from text or a dict.

A condition is given under `batch["prompt"]` as

- text: "a 3 moving left, fast", "a seven moving up slowly", "a 5" (words in any order; a missing part is
  left open), or
- a dict: `{"digit": 3, "direction": "left", "speed": "fast"}` (missing keys are left open), or
- an int: the digit alone.

`parse_condition` turns any of these into a `MotionCondition`; the backbone's conditioner embeds it and
rewards read it back from `cond["prompt"]` with the same parser. An open part is the conditioner's null
id for that slot (the null condition of classifier-free guidance leaves all three open).

Directions are "left", "right", "up", "down" (image coordinates: up = towards row 0); speeds are "slow"
(`SPEED_PIXELS["slow"]` = 1 pixel per frame) and "fast" (2 pixels per frame).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
#: pixels per frame of each speed (the data generator and the motion reward use the same numbers)
SPEED_PIXELS = {"slow": 1.0, "fast": 2.0}
#: unit (row, column) step of each direction in image coordinates
DIRECTION_VECTORS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}

_DIRECTION_WORDS = {
    **{d: d for d in DIRECTIONS},
    **{f"{d}ward": d for d in DIRECTIONS},
    **{f"{d}wards": d for d in DIRECTIONS},
}
_SPEED_WORDS = {"slow": "slow", "slowly": "slow", "fast": "fast", "quick": "fast", "quickly": "fast"}
_WORD = re.compile(r"[a-z]+|[0-9]")


@dataclass(frozen=True)
class MotionCondition:
    """A parsed condition; None marks a part the prompt leaves open."""

    digit: int | None = None
    direction: str | None = None
    speed: str | None = None

    def __post_init__(self) -> None:
        if self.digit is not None and not 0 <= self.digit <= 9:
            raise ValueError(f"digit must be 0-9, got {self.digit}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.speed is not None and self.speed not in SPEEDS:
            raise ValueError(f"speed must be one of {SPEEDS}, got {self.speed!r}")

    @property
    def velocity(self) -> tuple[float, float] | None:
        """(row, column) pixels per frame, or None when direction or speed is open."""
        if self.direction is None or self.speed is None:
            return None
        dy, dx = DIRECTION_VECTORS[self.direction]
        s = SPEED_PIXELS[self.speed]
        return dy * s, dx * s

    def text(self) -> str:
        """The canonical prompt, e.g. "a 3 moving left, fast" (open parts left out)."""
        return motion_prompt(self.digit, self.direction, self.speed)


def motion_prompt(digit: int | None, direction: str | None = None, speed: str | None = None) -> str:
    """The canonical text of a condition: "a 3 moving left, fast"; open parts are left out ("a 3")."""
    head = f"a {digit}" if digit is not None else "a digit"
    if direction is not None:
        head += f" moving {direction}"
    elif speed is not None:
        head += " moving"
    return f"{head}, {speed}" if speed is not None else head


def _from_text(text: str) -> MotionCondition:
    digit = direction = speed = None
    for w in _WORD.findall(text.lower()):
        if digit is None and w.isdigit():
            digit = int(w)
        elif digit is None and w in DIGIT_WORDS:
            digit = DIGIT_WORDS.index(w)
        elif direction is None and w in _DIRECTION_WORDS:
            direction = _DIRECTION_WORDS[w]
        elif speed is None and w in _SPEED_WORDS:
            speed = _SPEED_WORDS[w]
    return MotionCondition(digit, direction, speed)


def _from_dict(d: Mapping[str, Any]) -> MotionCondition:
    unknown = set(d) - {"digit", "direction", "speed"}
    if unknown:
        raise KeyError(
            f"a video condition dict has keys digit, direction, speed; got unknown {sorted(unknown)}"
        )
    digit = d.get("digit")
    direction, speed = d.get("direction"), d.get("speed")
    try:
        return MotionCondition(
            None if digit is None else int(digit),
            None if direction is None else _DIRECTION_WORDS.get(str(direction).lower(), str(direction)),
            None if speed is None else _SPEED_WORDS.get(str(speed).lower(), str(speed)),
        )
    except ValueError as e:
        raise ValueError(f"bad video condition {dict(d)}: {e}") from None


def parse_condition(prompt: Any) -> MotionCondition:
    """A `MotionCondition` from a prompt string, a dict (digit / direction / speed) or an int digit."""
    if isinstance(prompt, MotionCondition):
        return prompt
    if isinstance(prompt, Mapping):
        return _from_dict(prompt)
    if isinstance(prompt, bool):
        raise TypeError(f"a video condition is text, a dict or an int digit, got {prompt!r}")
    if isinstance(prompt, int):
        return MotionCondition(prompt)
    if isinstance(prompt, str):
        return _from_text(prompt)
    raise TypeError(f"a video condition is text, a dict or an int digit, got {type(prompt).__name__}")


def parse_conditions(
    prompts: Any, batch_size: int | None = None, who: str = "video"
) -> list[MotionCondition]:
    """`parse_condition` of every row of `cond["prompt"]`, checked against the batch size."""
    if prompts is None:
        raise ValueError(
            f"{who} needs the conditions of the clips it scores (cond['prompt']: text such as "
            "'a 3 moving left, fast', or dicts with digit / direction / speed)"
        )
    if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
        raise TypeError(f"{who}: prompts must be a list (one per clip), got {type(prompts).__name__}")
    out = [parse_condition(p) for p in prompts]
    if batch_size is not None and len(out) != batch_size:
        raise ValueError(f"{who}: got {len(out)} prompts for {batch_size} clips")
    return out


#: null id of each slot (one past the last value); the conditioner's tables have these many + 1 rows
NULL_IDS = (len(DIGIT_WORDS), len(DIRECTIONS), len(SPEEDS))


def condition_ids(conditions: Sequence[MotionCondition]) -> Tensor:
    """(B, 3) long ids (digit, direction, speed); an open part gets its slot's null id."""
    rows = [
        (
            NULL_IDS[0] if c.digit is None else c.digit,
            NULL_IDS[1] if c.direction is None else DIRECTIONS.index(c.direction),
            NULL_IDS[2] if c.speed is None else SPEEDS.index(c.speed),
        )
        for c in conditions
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 3)


def all_conditions() -> list[MotionCondition]:
    """Every fully specified condition: 10 digits × 4 directions × 2 speeds (80)."""
    return [MotionCondition(d, r, s) for d in range(10) for r in DIRECTIONS for s in SPEEDS]
