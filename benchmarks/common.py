"""Helpers shared by the benchmark scripts (each section is one concern; add your own, leave the rest)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


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
