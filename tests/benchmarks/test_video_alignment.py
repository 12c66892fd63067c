"""benchmarks/video_alignment.py's bookkeeping without training: the paired standard error of a gain over
the same (prompt, seed) pairs, and exploratory rows that never replace a recorded one."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from tests.helpers import REPO


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package; scripts import `common` by folder)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark():
    return load_script("video_alignment")


def test_paired_gain_is_the_se_of_the_per_pair_differences() -> None:
    common = load_script("common")
    paired_gain, paired_gains = common.paired_gain, common.paired_gains

    before = [0.1, 0.5, 0.9, 0.3]
    after = [0.2, 0.7, 1.0, 0.3]  # differences 0.1, 0.2, 0.1, 0.0: mean 0.1, sample std √(0.02/3)
    mean, se = paired_gain(before, after)
    assert math.isclose(mean, 0.1) and math.isclose(se, math.sqrt(0.02 / 3) / 2)
    # the clips' spread (0.1 … 0.9) is shared by both sides and cancels: far below the unpaired SE
    se_of = [load_benchmark()._mean_se(torch.tensor(v))[1] for v in (before, after)]
    assert se < math.hypot(*se_of) / 5
    assert paired_gains({"r": before, "only_before": [1.0]}, {"r": after}) == {"r": [mean, se]}
    assert math.isnan(paired_gain([float("nan")], [1.0])[0])  # a failed score drops its pair
    with pytest.raises(ValueError, match="4 values before but 3 after"):
        paired_gain([0.0] * 4, [0.0] * 3)


def test_exploratory_rows_get_their_own_key(tmp_path, monkeypatch) -> None:
    bench = load_benchmark()
    assert bench.row_key("grpo_motion", [], None, None, False) == "grpo_motion"
    assert bench.row_key("grpo_motion", ["--a.b=1"], None, None, False) == "grpo_motion@a.b=1"
    assert bench.row_key("grpo_motion", [], 2, None, False) == "grpo_motion@max_epochs=2"
    assert bench.row_key("grpo_motion", ["--a.b=1"], None, "kl", False) == "grpo_motion@kl"
    assert bench.row_key("grpo_motion", ["--a.b=1"], None, "kl", True) == "grpo_motion"
    out = tmp_path / "video_alignment.json"
    out.write_text(json.dumps({"alignment": [{"task": "grpo_motion", "gain": 0.1}]}))  # a row before `key`
    monkeypatch.setattr(bench, "OUT", out)
    bench._save("alignment", [{"task": "grpo_motion", "key": "grpo_motion@kl", "gain": 0.2}], "key")
    rows = json.loads(out.read_text())["alignment"]
    assert [r.get("key", r["task"]) for r in rows] == ["grpo_motion", "grpo_motion@kl"]
    bench._save("alignment", [{"task": "grpo_motion", "key": "grpo_motion", "gain": 0.3}], "key")
    rows = json.loads(out.read_text())["alignment"]
    assert sorted((r.get("key", r["task"]), r["gain"]) for r in rows) == [
        ("grpo_motion", 0.3),
        ("grpo_motion@kl", 0.2),
    ]


def test_base_of_a_lora_run_is_the_adapted_network_with_zeroed_adapters(tmp_path) -> None:
    from diffalign.core.lora import LoRABackbone
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.video.testing import tiny_video_backbone

    bench = load_benchmark()
    lora = LoRABackbone(tiny_video_backbone(), rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    policy = DiffusionPolicy(lora, num_steps=2)
    with torch.no_grad():
        for name, p in lora.inner.named_parameters():
            if "lora_B" in name:
                p.normal_()  # "trained" adapters
    cond = lora.condition({"prompt": ["a 1 moving left, fast"]})
    x = torch.randn(1, 1, 4, 8, 8)
    t = torch.full((1,), 300)
    base = bench._base_policy(policy, weights="unused for LoRA")
    with lora.reference() as reference:
        expected = reference.denoise(x, t, cond)
    assert torch.equal(base.backbone.denoise(x, t, cond), expected)
    assert not torch.allclose(lora.denoise(x, t, cond), expected)  # the trained policy is untouched

    (tmp_path / "config.yaml").write_text(
        "model:\n  init_args:\n    policy:\n      init_args:\n        backbone:\n"
        "          class_path: diffalign.core.lora.LoRABackbone\n          init_args:\n"
        "            weights: null\n            backbone:\n"
        "              init_args: {weights: base.safetensors}\n"
    )
    assert bench._start_weights(tmp_path) == "base.safetensors"
