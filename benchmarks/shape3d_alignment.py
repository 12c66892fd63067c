"""Shape alignment on CPU: every shape reward and the field's metrics, base model vs aligned, per recipe.

    python benchmarks/shape3d_alignment.py                              # every task
    python benchmarks/shape3d_alignment.py --tasks ddpo_stability draft_view_fidelity
    python benchmarks/shape3d_alignment.py --tasks test_time --seeds-per-prompt 8

Training tasks run their recipe through the CLI (`diffalign fit`, in-process) into a temporary run
folder. Then the base model (the recipe's starting weights) and the aligned one are sampled on the same
fixed (prompt, seed) pairs — the recipe's evaluation set: 6 primitive prompts × 16 seeds — with the
recipe's sampler, and every shape reward is measured on both (mean and standard error): view-class
fidelity, stability, mirror symmetry, surface uniformity, plus the view classifier's agreement with the
prompt and the share of stable shapes. MMD-CD / COV-CD / 1-NNA-CD against held-out primitives come from
the run's `shape_metrics.json` (32 samples and 32 references per prompt). `dpo_view_fidelity` first
makes its AI-feedback pairs (`diffalign feedback`, the recipe's sizes unless `--feedback-seeds`).

The `test_time` task samples the same pairs with plain sampling, best-of-10, SVDD (10 candidates) and
FK steering (10 particles) — 100 NFE each but the plain sampler's 10 — steering by the view classifier,
and reports the same rewards and metrics.

Prints a markdown table and writes benchmarks/results/shape3d_alignment.json (rows of tasks not run
this time are kept). A long measurement runs in parts (`--tasks ... --out part1.json`, ...) merged with
`--merge part1.json part2.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TASKS = {
    "ddpo_stability": "recipes/shape3d/ddpo_stability.yaml",
    "draft_view_fidelity": "recipes/shape3d/draft_view_fidelity.yaml",
    "alignprop_view_fidelity": "recipes/shape3d/alignprop_view_fidelity.yaml",
    "dpo_view_fidelity": "recipes/shape3d/dpo_view_fidelity.yaml",
    "draft_multi_reward": "recipes/shape3d/draft_multi_reward.yaml",
    "test_time": "recipes/shape3d/sample_plain.yaml",
}
TEST_TIME = {
    "plain": "recipes/shape3d/sample_plain.yaml",
    "best_of_n": "recipes/shape3d/sample_best_of_n.yaml",
    "svdd": "recipes/shape3d/sample_svdd.yaml",
    "fk": "recipes/shape3d/sample_fk.yaml",
}
METRICS = ("mmd_cd", "cov_cd", "nna_cd")


def measure_rewards():
    """The rewards every row reports (name -> reward)."""
    from diffalign.rewards.shape3d import MirrorSymmetry, Stability, SurfaceUniformity, ViewClassFidelity

    return {
        "view_class_fidelity": ViewClassFidelity(),
        "stability": Stability(),
        "mirror_symmetry": MirrorSymmetry(),
        "surface_uniformity": SurfaceUniformity(),
    }


def _mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(t))) if len(t) > 1 else 0.0


@torch.no_grad()
def reward_table(policy, pairs, method=None, steer=None, batch_size: int = 48) -> dict:
    """Mean and standard error of every measured reward (and the diagnostics) over `pairs`, sampled by
    `method` (None: the plain sampler) — plus the decoded samples for the metrics."""
    from diffalign.core.reward import SampleView
    from diffalign.core.sampling import sample_pairs

    rewards = measure_rewards()
    values: dict[str, list[float]] = {k: [] for k in [*rewards, "class_accuracy", "stable"]}
    layouts, nfe = [], []
    for batch in sample_pairs(policy, pairs, batch_size, reward=steer, method=method):
        view = SampleView(policy.backbone, batch.x0, batch.mask)
        for name, r in rewards.items():
            out = r.evaluate(view, batch.cond)
            values[name] += out.scores.tolist()
            if "class_accuracy" in out.info:
                values["class_accuracy"] += out.info["class_accuracy"].tolist()
            if "stable" in out.info:
                values["stable"] += out.info["stable"].tolist()
        layouts.append({k: v.cpu() for k, v in view.get({}).items()})
        nfe.append(batch.nfe_per_sample)
    table = {}
    for k, v in values.items():
        table[k], table[f"{k}_se"] = _mean_se(v)
    table["nfe_per_sample"] = sum(nfe) / len(nfe)
    samples = {k: torch.cat([lay[k] for lay in layouts]) for k in layouts[0]}
    return {"rewards": table, "samples": samples, "values": values}


def paired_gains(before: dict, after: dict) -> dict:
    """Mean gain of every measured reward over the same (prompt, seed) pairs, with the standard error of
    the per-pair differences (both runs sample each pair from the same noise, so the pairs are matched)."""
    out = {}
    for k, b in before.items():
        a = after[k]
        if len(a) != len(b) or not b:
            continue
        out[k], out[f"{k}_se"] = _mean_se([y - x for x, y in zip(b, a, strict=True)])
    return out


def metrics_of(samples: dict, pairs: list, per_prompt: int) -> dict:
    """MMD-CD / COV-CD / 1-NNA-CD of samples grouped by prompt (pairs in prompt order) vs references."""
    from diffalign.modalities.shape3d.data import reference_set
    from diffalign.modalities.shape3d.metrics import shape_metrics

    prompts = list(dict.fromkeys(p for p, _ in pairs))
    out = {k: 0.0 for k in METRICS}
    for i, prompt in enumerate(prompts):
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        ref = reference_set(prompt, per_prompt)
        m = shape_metrics(samples["points"][rows], samples["mask"][rows], ref.points, ref.mask)
        for k in METRICS:
            out[k] += m[k] / len(prompts)
    return out


def _backbone_weights(run: Path) -> str:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    args = cfg["model"]["init_args"]["policy"]["init_args"]["backbone"].get("init_args") or {}
    return args.get("weights") or "pkg://diffalign.modalities.shape3d/shapes_flow_base.safetensors"


def make_feedback(folder: Path, seeds: int | None) -> Path:
    from diffalign.core.cli import cli_main

    args = [
        "feedback",
        "--config",
        str(REPO / "recipes/shape3d/feedback_view_fidelity.yaml"),
        "--output",
        str(folder),
    ]
    if seeds:
        args += ["--seeds_per_prompt", str(seeds)]
    t0 = time.perf_counter()
    assert cli_main(args) == 0
    print(f"feedback pairs in {time.perf_counter() - t0:.0f} s -> {folder / 'pairs.jsonl'}")
    return folder / "pairs.jsonl"


def run_fit_task(name: str, extra: list[str], tmp: Path, feedback_seeds: int | None) -> dict:
    from diffalign.core.cli import cli_main
    from diffalign.core.io import load_state_dict

    recipe = TASKS[name]
    args = ["fit", "--config", str(REPO / recipe), "--run_root", str(tmp / "runs")]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]
    if name == "dpo_view_fidelity":
        pairs_file = make_feedback(tmp / "feedback", feedback_seeds)
        args.append(f"--data.init_args.path={pairs_file}")
    t0 = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "summary.json").read_text())
    shape = json.loads((run / "shape_metrics.json").read_text())
    pairs = cli.datamodule.evaluation_set()
    aligned = cli.model.policy
    base = copy.deepcopy(aligned)
    load_state_dict(base.backbone, _backbone_weights(run))
    before, after = reward_table(base, pairs), reward_table(aligned, pairs)
    n = summary["eval_samples"]
    se = math.sqrt((summary["reward_before_std"] ** 2 + summary["reward_after_std"] ** 2) / n)
    return {
        "task": name,
        "recipe": recipe,
        "reward": summary["reward_name"],
        "reward_before": summary["reward_before"],
        "reward_after": summary["reward_after"],
        "gain": summary["reward_after"] - summary["reward_before"],
        "gain_standard_error": se,
        "eval_samples": n,
        "optimizer_steps": summary["global_step"],
        "reward_queries": summary["reward_queries"],
        "train_wall_seconds": summary["wall_seconds"],
        "total_wall_seconds": round(wall, 1),
        "before": before["rewards"],
        "after": after["rewards"],
        "paired_gain": paired_gains(before["values"], after["values"]),
        "metrics_before": {k: shape["before"][k] for k in METRICS},
        "metrics_after": {k: shape["after"][k] for k in METRICS},
    }


def run_test_time(seeds_per_prompt: int) -> list[dict]:
    from diffalign.core.recipes import expand_config_args
    from diffalign.core.sample import build_parser
    from diffalign.core.sampling import seed_pairs

    rows = []
    for name, recipe in TEST_TIME.items():
        argv, _ = expand_config_args(["--config", str(REPO / recipe)])
        parser = build_parser()
        init = parser.instantiate_classes(parser.parse_args(list(argv)))
        policy, reward, method = init.policy.eval(), init.reward.freeze(), init.method
        pairs = seed_pairs(init.prompts, seeds_per_prompt, init.seed)
        t0 = time.perf_counter()
        out = reward_table(policy, pairs, method=method, steer=reward)
        rows.append(
            {
                "task": f"test_time/{name}",
                "recipe": recipe,
                "method": type(method).__name__,
                "reward": reward.name,
                "eval_samples": len(pairs),
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "after": out["rewards"],
                "metrics_after": metrics_of(out["samples"], pairs, seeds_per_prompt),
            }
        )
        r = out["rewards"]
        print(f"{name}: view class fidelity {r['view_class_fidelity']:.4f} at {r['nfe_per_sample']:.0f} NFE")
    return rows


def _fmt(row: dict, key: str) -> str:
    a = row.get("after", {})
    b = row.get("before")
    if b is None:
        return f"{a[key]:.3f} ± {a[key + '_se']:.3f}"
    return f"{b[key]:.3f} → {a[key]:.3f} (±{a[key + '_se']:.3f})"


def print_table(rows: list[dict]) -> None:
    keys = (
        "view_class_fidelity",
        "class_accuracy",
        "stability",
        "stable",
        "mirror_symmetry",
        "surface_uniformity",
    )
    head = (
        "| task | trained on | gain (±2 SE; paired ±2 SE) | "
        + " | ".join(keys)
        + " | MMD-CD | COV-CD | 1-NNA-CD | NFE |"
    )
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        gain = f"{r['gain']:+.4f} (±{2 * r['gain_standard_error']:.4f})" if "gain" in r else "—"
        paired = r.get("paired_gain", {})
        if r["reward"] in paired:
            gain += f"; paired ±{2 * paired[r['reward'] + '_se']:.4f}"
        mb, ma = r.get("metrics_before"), r["metrics_after"]
        mets = [f"{mb[k]:.4f} → {ma[k]:.4f}" if mb else f"{ma[k]:.4f}" for k in METRICS]
        cells = [
            r["task"],
            r["reward"],
            gain,
            *[_fmt(r, k) for k in keys],
            *mets,
            f"{r['after']['nfe_per_sample']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--max-epochs", type=int, default=None, help="override the recipes' trainer.max_epochs")
    ap.add_argument("--seeds-per-prompt", type=int, default=16, help="test_time: samples per prompt")
    ap.add_argument("--feedback-seeds", type=int, default=None, help="dpo: groups per prompt of the feedback")
    ap.add_argument("--out", default=str(RESULTS / "shape3d_alignment.json"))
    ap.add_argument("--run-root", default=None, help="keep run folders here (default: a temp folder)")
    ap.add_argument("--merge", nargs="+", default=None, help="run nothing: merge these results into --out")
    ap.add_argument("overrides", nargs="*", help="extra `diffalign fit` arguments (after --)")
    args = ap.parse_args(argv)
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())["rows"]]
        print_table(rows)
        write_rows(rows, Path(args.out))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extra = [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    extra += list(args.overrides)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.run_root or scratch
        for name in args.tasks:
            if name == "test_time":
                rows += run_test_time(args.seeds_per_prompt)
            else:
                rows.append(run_fit_task(name, extra, Path(tmp) / name, args.feedback_seeds))
    print_table(rows)
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for r in rows:
        r.update(machine=machine, max_epochs_override=args.max_epochs, overrides=list(args.overrides))
    write_rows(rows, Path(args.out))


def write_rows(rows: list[dict], out_path: Path) -> None:
    """Write `rows` to `out_path`, keeping the rows of tasks they do not include (a later row of a task
    replaces an earlier one)."""
    kept = []
    if out_path.is_file():
        ran = {r["task"] for r in rows}
        kept = [r for r in json.loads(out_path.read_text()).get("rows", []) if r.get("task") not in ran]
    order = [*TASKS, *(f"test_time/{k}" for k in TEST_TIME)]
    rows = list({r["task"]: r for r in rows}.values())
    out = {"rows": sorted(kept + rows, key=lambda r: order.index(r["task"]) if r["task"] in order else 99)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
