"""benchmarks/sample_efficiency.py --from-json: merging part files, including a file that is itself a merge,
re-summarises the stored runs without training (table, JSON, plot) and keeps every part's command."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "sample_efficiency", REPO / "benchmarks/sample_efficiency.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_record(name: str, rewards: list[float], diversity: list[float]) -> dict:
    """A stored run as a worker writes it: evaluation rounds at 0, 384 and 768 queries."""
    curve = [
        {"reward_queries": q, "reward": r, "reward_std": 0.1, "updates": q // 64, "failed": 0, "diversity": d}
        for q, r, d in zip((0, 384, 768), rewards, diversity, strict=True)
    ]
    return {
        "recipe": f"recipes/image/{name}.yaml",
        "algorithm": name.upper(),
        "seed": 0,
        "family": {"weights_sha256": "abc", "prediction_type": "flow", "kernel": "FlowSDEKernel"},
        "queries_per_batch": 64,
        "reward_queries": 768,
        "updates": 12,
        "curve": curve,
        "train_wall_s": 10.0,
        "eval_wall_s": 1.0,
        "peak_mem_mib": 100.0,
        "peak_mem_kind": "ru_maxrss (process)",
        "eval_samples": 60,
        "device": "cpu",
    }


def part_file(folder: Path, name: str, runs: dict, command: str, **extra) -> Path:
    path = folder / f"{name}.json"
    body = {"command": command, "date": "2026-12-02T01:00:00+00:00", "budget": 768, "rounds": 2, "seeds": [0]}
    body.update(runs=runs, machine={"device": "cpu"}, **extra)
    path.write_text(json.dumps(body))
    return path


def test_merging_a_merged_file_with_new_parts_keeps_every_run_and_part_command(tmp_path: Path) -> None:
    bench = load_benchmark()
    old_parts = [{"command": "part ddpo", "date": "d1"}, {"command": "part nft", "date": "d2"}]
    old_runs = {
        "ddpo": [run_record("ddpo", [0.5, 0.55, 0.6], [30, 29, 28])],
        "nft": [run_record("nft", [0.5, 0.8, 0.9], [30, 20, 16])],
    }
    merged = part_file(tmp_path, "merged", old_runs, "part ddpo", merged_from=old_parts)
    refl = {"refl": [run_record("refl", [0.5, 0.95, 1.0], [30, 8, 5])]}
    new = part_file(tmp_path, "refl", refl, "part refl")
    out = tmp_path / "out"
    argv = ["--from-json", str(merged), str(new), "--name", "m", "--reference", "ddpo", "--out-dir", str(out)]
    result = bench.main(argv)
    assert list(result["runs"]) == ["ddpo", "nft", "refl"]
    assert [p["command"] for p in result["merged_from"]] == ["part ddpo", "part nft", "part refl"]
    rows = {r["name"]: r for r in result["algorithms"]}
    assert rows["refl"]["final_reward"] == pytest.approx(1.0)
    assert rows["refl"]["final"]["diversity"] == 5 and rows["refl"]["start"]["diversity"] == 30
    assert rows["ddpo"]["queries_to_reference"] == pytest.approx(768)  # where DDPO first reaches its 0.6
    assert (out / "sample_efficiency_m.json").is_file() and (out / "sample_efficiency_m.png").is_file()


def test_a_recipe_in_two_merged_files_is_refused(tmp_path: Path) -> None:
    bench = load_benchmark()
    runs = {"ddpo": [run_record("ddpo", [0.5, 0.55, 0.6], [30, 29, 28])]}
    a = part_file(tmp_path, "a", runs, "a")
    b = part_file(tmp_path, "b", runs, "b")
    with pytest.raises(SystemExit, match="b.json has runs of 'ddpo'"):
        bench.main(["--from-json", str(a), str(b), "--out-dir", str(tmp_path / "out")])
