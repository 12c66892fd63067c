"""Re-measure the toy figures the docs quote beyond the recipes' own before/after (runs with overrides,
resumed runs, EMA, sampling with a checkpoint, per-step metrics) and write them as one JSON.

    python benchmarks/doc_figures.py                     # every case, ~10 min on 2 busy cores
    python benchmarks/doc_figures.py --cases resume ema  # some of them

Each case is the `diffalign` command a page shows (`fit`, `sample`, `feedback`), run in-process with one
CPU thread in a temporary folder; it records the run's `summary.json` (or `results.json`) and, for the
named `metrics.csv` columns, the first, last, min, max and mean over the logged training steps. The
before/after of the shipped recipes themselves come from `benchmarks/recipe_results.py`
(`benchmarks/results/recipes_toy.json`). Rewards are seeded and reproduce exactly on the same torch
build; wall times depend on the machine's load. Writes `benchmarks/results/doc_figures_toy.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
ALGO = "--model.init_args.algorithm.init_args."


def fit(args: list[str], cwd: Path) -> Path:
    """`diffalign fit <args>` into `cwd/runs`; returns the run folder."""
    from diffalign.core.cli import cli_main

    cli = cli_main(["fit", *args, "--run_root", str(cwd / "runs"), *QUIET])
    return Path(cli.trainer.log_dir)


def sample(args: list[str], cwd: Path, name: str) -> dict:
    """`diffalign sample <args>`; returns results.json without its rows."""
    from diffalign.core.cli import cli_main

    out = cwd / "samples" / name
    code = cli_main(["sample", *args, "--output", str(out), "--progress", "false"])
    if code != 0:
        raise SystemExit(f"diffalign sample {args} failed ({code})")
    res = json.loads((out / "results.json").read_text())
    res.pop("rows")
    res.pop("wall_seconds")
    return res


def metrics(run: Path, columns: list[str]) -> dict:
    """first/last/min/max/mean (and the step of the extremes) of each column over the logged rows."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    out = {}
    for col in columns:
        vals = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        if not vals:
            out[col] = None
            continue
        ys = [v for _, v in vals]
        out[col] = {
            "first": ys[0],
            "last": ys[-1],
            "min": min(ys),
            "max": max(ys),
            "mean": sum(ys) / len(ys),
            "count": len(ys),
            "argmax_step": vals[ys.index(max(ys))][0],
        }
    return out


def series(run: Path, column: str) -> list[tuple[int, float]]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]


def summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    keep = (
        "reward_before",
        "reward_after",
        "reward_after_std",
        "reward_queries",
        "global_step",
        "wall_seconds",
    )
    return {k: s.get(k) for k in keep}


# ---------------------------------------------------------------------------------------------------
# The cases (each names the page that quotes it)
# ---------------------------------------------------------------------------------------------------
def case_ddpo(cwd: Path) -> dict:
    """ddpo.md / debugging.md: the shipped recipe; its ratio diagnostics over all 160 steps."""
    run = fit(["--config", "toy/ddpo_mode"], cwd)
    cols = ["train/first_update_ratio_dev", "train/approx_kl", "train/clipfrac", "train/ratio_mean"]
    return {
        "command": "diffalign fit --config recipes/toy/ddpo_mode.yaml",
        **summary(run),
        **metrics(run, cols),
    }


def case_ddpo_short(cwd: Path) -> dict:
    """ddpo.md pitfall 4: 5 epochs with one update per rollout vs train_batch_size 16 (4 per rollout)."""
    base = ["--config", "toy/ddpo_mode", "--trainer.max_epochs", "5"]
    one = fit(base, cwd)
    four = fit([*base, f"{ALGO}train_batch_size", "16"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/ddpo_mode.yaml --trainer.max_epochs 5 "
        f"[{ALGO}train_batch_size 16]",
        "one_update": {**summary(one), **metrics(one, ["train/clipfrac", "train/updates"])},
        "train_batch_size_16": {**summary(four), **metrics(four, ["train/clipfrac", "train/updates"])},
    }


def case_ratio_check(cwd: Path) -> dict:
    """debugging.md: a strict RatioConsistencyCheck over 4 epochs passes."""
    cfg = cwd / "ratio_check.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: diffalign.core.callbacks.RatioConsistencyCheck\n"
        "      init_args: {tolerance: 1.0e-6, raise_error: true}\n"
    )
    run = fit(["--config", "toy/ddpo_mode", "--config", str(cfg), "--trainer.max_epochs", "4"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/ddpo_mode.yaml --config ratio_check.yaml "
        "--trainer.max_epochs 4",
        "run_folder_name": run.parent.name,
        **metrics(run, ["train/first_update_ratio_dev"]),
    }


def case_dpok(cwd: Path) -> dict:
    """dpok.md: the KL to the reference at the end of the shipped recipe."""
    run = fit(["--config", "toy/dpok_mode"], cwd)
    cols = ["train/kl", "train/policy_loss", "train/first_update_ratio_dev", "train/approx_kl"]
    return {
        "command": "diffalign fit --config recipes/toy/dpok_mode.yaml",
        **summary(run),
        **metrics(run, cols),
    }


def case_grpo(cwd: Path) -> dict:
    """grpo.md: zero_std_ratio and the first-update ratio of both GRPO recipes."""
    out = {}
    for name in ("grpo_mode", "grpo_flow_mode"):
        run = fit(["--config", f"toy/{name}"], cwd)
        out[name] = {**summary(run), **metrics(run, ["train/zero_std_ratio", "train/first_update_ratio_dev"])}
    return {"command": "diffalign fit --config recipes/toy/{grpo_mode,grpo_flow_mode}.yaml", **out}


def case_draft_long(cwd: Path) -> dict:
    """draft.md pitfall 1: DRaFT-K run past its recipe's length collapses."""
    run = fit(["--config", "toy/draft_mode", "--trainer.max_epochs", "80"], cwd)
    curve = series(run, "train/reward_mean")
    return {
        "command": "diffalign fit --config recipes/toy/draft_mode.yaml --trainer.max_epochs 80",
        **summary(run),
        **metrics(run, ["train/reward_mean"]),
        "reward_mean_by_step": curve,
    }


def case_refl(cwd: Path) -> dict:
    """refl.md: the training reward (of x̂0) at the end of the shipped recipe."""
    run = fit(["--config", "toy/refl_mode"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/refl_mode.yaml",
        **summary(run),
        **metrics(run, ["train/reward_mean", "train/step_index"]),
    }


def case_alignprop(cwd: Path) -> dict:
    """alignprop.md: the drawn K (logged as grad_steps)."""
    run = fit(["--config", "toy/alignprop_mode"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/alignprop_mode.yaml",
        **summary(run),
        **metrics(run, ["train/grad_steps"]),
    }


def case_rwr(cwd: Path) -> dict:
    """rwr.md: effective sample size and largest weight, first and last batch."""
    run = fit(["--config", "toy/rwr_mode"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/rwr_mode.yaml",
        **summary(run),
        **metrics(run, ["train/effective_samples", "train/weight_max"]),
    }


def case_raft(cwd: Path) -> dict:
    """raft.md: reward of the winners vs of all samples, first and last batch."""
    run = fit(["--config", "toy/raft_mode"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/raft_mode.yaml",
        **summary(run),
        **metrics(run, ["train/reward_selected_mean", "train/reward_mean"]),
    }


def case_preference(cwd: Path) -> dict:
    """preference.md: KTO's undesirable weight over 10 epochs; the toy reward model's held-out accuracy."""
    from recipe_results import make_feedback

    make_feedback("toy/feedback_target", "pairs", cwd)
    make_feedback("toy/feedback_target", "unpaired", cwd)
    out = {}
    for w in ("1.0", "0.2", "0.0"):
        run = fit(
            ["--config", "toy/kto_target", "--trainer.max_epochs", "10", f"{ALGO}undesirable_weight", w],
            cwd,
        )
        out[f"kto_undesirable_{w}_10_epochs"] = summary(run)
    run = fit(["--config", "toy/reward_model_bt"], cwd)
    out["reward_model_bt"] = metrics(run, ["val/pair_accuracy", "train/pair_accuracy"])
    return {
        "command": "diffalign fit --config recipes/toy/kto_target.yaml --trainer.max_epochs 10 "
        f"{ALGO}undesirable_weight W; diffalign fit --config recipes/toy/reward_model_bt.yaml",
        **out,
    }


def case_resume(cwd: Path) -> dict:
    """quickstart.md: 3 + 3 epochs (resumed) equal 6 epochs in one go."""
    first = fit(["--config", "toy/ddpo_mode", "--trainer.max_epochs", "3"], cwd)
    ckpt = first / "checkpoints" / "last.ckpt"
    resumed = fit(["--config", "toy/ddpo_mode", "--trainer.max_epochs", "6", "--ckpt_path", str(ckpt)], cwd)
    whole = fit(["--config", "toy/ddpo_mode", "--trainer.max_epochs", "6"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/ddpo_mode.yaml --trainer.max_epochs 3, then 6 with "
        "--ckpt_path; against 6 in one go",
        "same_folder": resumed == first,
        "resumed": summary(resumed),
        "uninterrupted": summary(whole),
    }


def case_ema(cwd: Path) -> dict:
    """debugging.md: EMA 0.9 over 4 epochs, resumed after 2 and in one go, and without EMA."""
    ema = ["--model.init_args.ema_decay", "0.9"]
    base = ["--config", "toy/ddpo_mode"]
    first = fit([*base, *ema, "--trainer.max_epochs", "2"], cwd)
    resumed = fit(
        [*base, *ema, "--trainer.max_epochs", "4", "--ckpt_path", str(first / "checkpoints" / "last.ckpt")],
        cwd,
    )
    whole = fit([*base, *ema, "--trainer.max_epochs", "4"], cwd)
    plain = fit([*base, "--trainer.max_epochs", "4"], cwd)
    return {
        "command": "diffalign fit --config recipes/toy/ddpo_mode.yaml [--model.init_args.ema_decay 0.9] "
        "--trainer.max_epochs 4 (and 2 + resume to 4)",
        "ema_resumed": summary(resumed),
        "ema_uninterrupted": summary(whole),
        "no_ema": summary(plain),
    }


def case_sample(cwd: Path) -> dict:
    """sample.md / test_time.md: sampling recipes on the base model and on the DDPO-aligned checkpoint."""
    out = {
        "sample_fk": sample(["--config", "toy/sample_fk"], cwd, "fk"),
        "sample_plain": sample(["--config", "toy/sample_plain"], cwd, "plain"),
        "sample_fk_svdd8": sample(
            [
                "--config",
                "toy/sample_fk",
                "--method",
                "diffalign.core.guidance.SVDD",
                "--method.init_args.candidates",
                "8",
            ],
            cwd,
            "svdd8",
        ),
        "sample_plain_20_steps_cfg2": sample(
            [
                "--config",
                "toy/sample_plain",
                "--policy.init_args.num_steps",
                "20",
                "--policy.init_args.guidance_scale",
                "2.0",
            ],
            cwd,
            "cfg",
        ),
        "sample_fk_batch_size_64": sample(["--config", "toy/sample_fk", "--batch_size", "64"], cwd, "b64"),
    }
    run = fit(["--config", "toy/ddpo_mode"], cwd)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out["aligned_plain"] = sample(["--config", "toy/sample_plain", "--ckpt_path", ckpt], cwd, "a_plain")
    out["aligned_fk"] = sample(["--config", "toy/sample_fk", "--ckpt_path", ckpt], cwd, "a_fk")
    out["aligned_fit"] = summary(run)
    return {"command": "diffalign sample --config recipes/toy/sample_<method>.yaml [--ckpt_path ...]", **out}


def case_pretrain(cwd: Path) -> dict:
    """supervised.md: how close the toy pretrain recipe comes to the shipped toy_base.safetensors."""
    from safetensors.torch import load_file

    export = cwd / "toy_base.safetensors"
    cb = f"[{{class_path: diffalign.core.callbacks.ExportBackbone, init_args: {{path: {export}}}}}]"
    t0 = time.perf_counter()
    fit(["--config", "toy/pretrain", "--trainer.callbacks", cb], cwd)
    wall = time.perf_counter() - t0
    new, shipped = (
        load_file(str(export)),
        load_file(str(REPO / "modalities" / "toy" / "toy_base.safetensors")),
    )
    equal = set(new) == set(shipped) and all(new[k].equal(shipped[k]) for k in new)
    diff = max(float((new[k] - shipped[k]).abs().max()) for k in new) if set(new) == set(shipped) else None
    return {
        "command": "diffalign fit --config recipes/toy/pretrain.yaml "
        "--trainer.callbacks '[ExportBackbone to a temporary file]'",
        "tensors": len(new),
        "bitwise_equal_to_shipped": equal,
        "max_abs_difference": diff,
        "wall_seconds": round(wall, 1),
    }


CASES = {name.removeprefix("case_"): fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def _clean(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=None, help=f"default: all of {sorted(CASES)}")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "doc_figures_toy.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = args.cases or sorted(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(CASES)}")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.pop("_meta", None)
    old = Path.cwd()
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)  # recipes are given by name; preference data is read from feedback/ here
            t0 = time.perf_counter()
            try:
                results[name] = _clean(CASES[name](Path(tmp)))
            finally:
                os.chdir(old)
            results[name]["case_wall_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({name: results[name]})[:2000], file=sys.stderr)
    results["_meta"] = {
        "torch": torch.__version__,
        "threads": 1,
        "command": "python benchmarks/doc_figures.py",
    }
    args.out.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
