"""benchmarks/common.py: the paired standard error of a before/after gain."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_gain_is_the_standard_error_of_the_differences():
    common = _common()
    before = [0.0, 1.0, 0.0, 1.0]
    after = [0.5, 1.0, 0.5, 1.0]  # differences 0.5, 0, 0.5, 0: mean 0.25, sd 1/sqrt(12)
    gain, se = common.paired_gain(before, after)
    assert gain == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(1 / 12) / 2)
    # matched scores: far below the unpaired error sqrt(var_b/n + var_a/n)
    unpaired = math.sqrt((1 / 3) / 4 + (1 / 12) / 4)
    assert se < unpaired / 2
    out = common.paired_gains({"r": before, "only_before": [1.0, 2.0]}, {"r": after})
    assert set(out) == {"r", "r_se"}


def test_paired_gain_rejects_unmatched_lists():
    with pytest.raises(ValueError, match="4 scores before but 3 after"):
        _common().paired_gain([0.0] * 4, [0.0] * 3)
