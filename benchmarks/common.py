"""Helpers shared by the benchmark scripts (each helper in its own section)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# --- paired gains (audio_alignment.py) ---------------------------------------------------------------


def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-pair differences `after[i] - before[i]`.

    For before/after scores of the same (prompt, seed) pairs sampled from the same noise: the pairs are
    matched, so the gain's standard error is that of the differences, not of two independent means.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_gain: {len(before)} scores before but {len(after)} after")
    diffs = [a - b for b, a in zip(before, after, strict=True) if math.isfinite(a - b)]
    if len(diffs) < 2:
        raise ValueError(f"paired_gain needs at least 2 finite pairs, got {len(diffs)}")
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def paired_gains(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]]) -> dict:
    """`paired_gain` of every key the two share: {key: gain, key_se: its standard error}."""
    out: dict[str, float] = {}
    for key, b in before.items():
        if key in after:
            out[key], out[f"{key}_se"] = paired_gain(b, after[key])
    return out
