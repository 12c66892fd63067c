"""Run training recipes as shipped and tabulate what their summary.json says (the figures the docs quote).

    python benchmarks/recipe_results.py --modality toy            # every toy training recipe, ~2 min idle
    python benchmarks/recipe_results.py --recipes toy/ddpo_mode toy/grpo_mode

Each recipe runs in-process with `diffalign fit` (1 CPU thread, its own run folder under a temporary
root); preference recipes first get their AI-feedback data from the matching `feedback_*` recipe.
Prints one row per recipe — reward before → after over the recipe's fixed evaluation set, the gain with
two standard errors (of the difference of two independent means), reward queries, optimiser steps and
wall seconds — and writes `benchmarks/results/recipes_<modality>.json`. Wall times depend on how busy
the machine is; the rewards do not (seeded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: preference recipes and the feedback recipe (and layout) whose output they read
FEEDBACK = {
    "toy/dpo_target": ("toy/feedback_target", "pairs"),
    "toy/kto_target": ("toy/feedback_target", "unpaired"),
    "toy/reward_model_bt": ("toy/feedback_target", "pairs"),
}
SKIP_PREFIXES = ("pretrain", "feedback", "sample", "reward_model")


def training_recipes(modality: str) -> list[str]:
    """The fit recipes of a modality that align a model (pretraining and reward models excluded)."""
    from diffalign.core.recipes import recipe_command

    root = REPO / "recipes" / modality
    out = []
    for p in sorted(root.glob("*.yaml")):
        if p.stem.startswith(SKIP_PREFIXES) or recipe_command(p) != "fit":
            continue
        out.append(f"{modality}/{p.stem}")
    return out


def make_feedback(recipe: str, layout: str, cwd: Path) -> None:
    from diffalign.core.cli import cli_main

    name = Path(recipe).name + ("_unpaired" if layout == "unpaired" else "")
    out = cwd / "feedback" / name
    if (out / "pairs.jsonl").is_file():
        return
    code = cli_main(["feedback", "--config", recipe, "--output", str(out), "--layout", layout])
    if code != 0:
        raise SystemExit(f"feedback for {recipe} failed")


def run(recipe: str, cwd: Path) -> dict:
    from diffalign.core.cli import cli_main

    if recipe in FEEDBACK:
        make_feedback(*FEEDBACK[recipe], cwd)
    t0 = time.perf_counter()
    cli = cli_main(
        ["fit", "--config", recipe, "--run_root", str(cwd / "runs"), "--trainer.enable_progress_bar=false"]
    )
    wall = time.perf_counter() - t0
    s = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    n = max(1, s.get("eval_samples") or 1)
    se = math.sqrt(((s.get("reward_before_std") or 0) ** 2 + (s.get("reward_after_std") or 0) ** 2) / n)
    return {
        "recipe": recipe,
        "reward": s.get("reward_name"),
        "before": s.get("reward_before"),
        "after": s.get("reward_after"),
        "gain": None if s.get("reward_after") is None else s["reward_after"] - s["reward_before"],
        "gain_2se": 2 * se,
        "eval_samples": s.get("eval_samples"),
        "reward_queries": s.get("reward_queries"),
        "steps": s.get("global_step"),
        "wall_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", default="toy")
    p.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: every training recipe)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/...)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    recipes = args.recipes or training_recipes(args.modality)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        old = Path.cwd()
        os.chdir(cwd)  # preference recipes read feedback/... relative to the working folder
        try:
            for r in recipes:
                rows.append(run(r, cwd))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            os.chdir(old)
    print("\n| recipe | reward | before → after | gain (±2 SE) | queries | steps | wall s |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        if r["after"] is None:
            print(
                f"| {r['recipe']} | – | – | – | {r['reward_queries']} | {r['steps']} | {r['wall_seconds']} |"
            )
            continue
        print(
            f"| {r['recipe']} | {r['reward']} | {r['before']:.4f} → {r['after']:.4f} | "
            f"{r['gain']:+.4f} (±{r['gain_2se']:.4f}) | {r['reward_queries']} | {r['steps']} | "
            f"{r['wall_seconds']} |"
        )
    out = args.out or REPO / "benchmarks" / "results" / f"recipes_{args.modality}.json"
    command = " ".join(
        ["python", "benchmarks/recipe_results.py", *(argv if argv is not None else sys.argv[1:])]
    )
    out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
