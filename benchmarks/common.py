"""Helpers shared by the benchmark scripts (each section is one concern; add your own, leave the rest)."""

from __future__ import annotations

import fcntl
import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


# -- paired gains over fixed (prompt, seed) pairs (video_alignment, audio_alignment) ----------------
def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-pair differences after − before and its standard error.

    For an evaluation that samples the base and the aligned model on the same (prompt, seed) pairs from
    the same noise, so the i-th value of both lists is the same pair; the seed noise common to both
    cancels in the differences, unlike in √(SE_before² + SE_after²).
    """
    if len(before) != len(after):
        raise ValueError(f"paired_gain: {len(before)} values before but {len(after)} after")
    diffs = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    diffs = [d for d in diffs if math.isfinite(d)]  # a failed score (NaN) drops its pair
    if not diffs:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def paired_gains(
    before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]]
) -> dict[str, list[float]]:
    """`paired_gain` of every metric the two mappings share: name → [mean gain, paired SE]."""
    return {k: list(paired_gain(before[k], after[k])) for k in before if k in after}


# -- result files: recorded rows and exploratory ones (video_alignment, audio_alignment) -------------
def row_key(
    task: str, overrides: Sequence[str], max_epochs: int | None, label: str | None, record: bool
) -> str:
    """The JSON key of a result row: the task itself for the recipe as it is (or with `record`), else
    `task@label`, the label defaulting to the overrides, so exploratory runs never replace recorded rows."""
    if record or not (overrides or max_epochs):
        return task
    if not label:
        parts = [f"max_epochs={max_epochs}"] if max_epochs else []
        label = " ".join(parts + [o.removeprefix("--") for o in overrides])
    return f"{task}@{label}"


def dumps(data: dict) -> str:
    """JSON with an indent of 2, but every list of plain numbers on one line (per-sample values)."""
    text = json.dumps(data, indent=2)
    number_list = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+|,\s*NaN)*)\s*\]")
    return number_list.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def _key_of(row: dict, key: str) -> str:
    return row.get(key, row.get("task"))


def save_rows(
    path: Path, section: str, rows: list[dict], key: str = "key", order: Callable[[dict], int] | None = None
) -> None:
    """Merge `rows` into the results file's `section`, replacing the rows of the keys they carry and
    keeping every other row (rows recorded before `key` existed count as keyed by their task); sorted by
    `order` when given. Under a lock: tasks may run in parallel processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"diffalign_{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        ran = {_key_of(r, key) for r in rows}
        merged = [r for r in data.get(section, []) if _key_of(r, key) not in ran] + rows
        data[section] = sorted(merged, key=order) if order else merged
        path.write_text(dumps(data) + "\n")
    print(f"wrote {path} ({section})")
