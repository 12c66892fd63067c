"""Speed options that change the algorithm, and what they cost in reward: DDPO on the digits (CPU).

    python benchmarks/speed_tradeoffs.py                         # every variant, the recipe's 12 epochs
    python benchmarks/speed_tradeoffs.py --max-epochs 6 --variants baseline rollout_steps_5

Each variant is `recipes/image/ddpo_digit_fidelity.yaml` (the 16x16 flow-matching digit model, DDPO toward
DigitFidelity, 10 sampling steps, timestep_fraction 0.5, no classifier-free guidance) with one override,
trained in-process through `diffalign fit` with the same seed; `summary.json` gives the reward over the
recipe's fixed evaluation set (10 prompts x 26 seeds) before and after training. Work is the number of
denoiser rows a training step evaluates, relative to the baseline: rollout rows x steps (x2 with guidance)
plus trained rows x trained steps x 3 (forward + backward ~ three forwards) x2 with guidance; it is a model
of the cost, exact on any machine, while the wall seconds depend on how busy this one is. Prints a markdown
table and writes benchmarks/results/speed_tradeoffs_digits.json.

Variants:
- baseline: the recipe as shipped.
- timestep_fraction_1 / timestep_fraction_0.25: train on all / a quarter of the 10 steps of each sample.
- rollout_steps_5: training rollouts with 5 steps; evaluation keeps 10 (`DiffusionPolicy.rollout_steps`).
- cfg_3: sample and train WITH classifier-free guidance 3 (two denoiser rows per sample and step), i.e. the
  cost that training without guidance (the baseline) saves; evaluated at guidance 3 too.
- grpo_baseline / grpo_sde_window_3: the SDE window is a GRPO option (MixGRPO), so its pair is
  `recipes/image/grpo_flow_digit_fidelity.yaml` (Flow-GRPO, all 10 steps stochastic and trained) as shipped
  and with a 3-step window (ODE steps elsewhere, only the window stored and trained; it moves 2 steps
  later every 8 batches and starts over, as `recipes/image/grpo_window_digit_fidelity.yaml`). Its work is
  relative to grpo_baseline.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/image/ddpo_digit_fidelity.yaml"
POLICY = "--model.init_args.policy.init_args"
ALGO = "--model.init_args.algorithm.init_args"
GRPO_RECIPE = "recipes/image/grpo_flow_digit_fidelity.yaml"
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "timestep_fraction_1": [f"{ALGO}.timestep_fraction=1.0"],
    "timestep_fraction_0.25": [f"{ALGO}.timestep_fraction=0.25"],
    "rollout_steps_5": [f"{POLICY}.rollout_steps=5"],
    "cfg_3": [f"{POLICY}.guidance_scale=3.0"],
    "grpo_baseline": [],
    "grpo_sde_window_3": [
        f"{ALGO}.sde_window_size=3",
        f"{ALGO}.sde_window_shift_every=8",
        f"{ALGO}.sde_window_stride=2",
        f"{ALGO}.sde_window_roll_back=true",
    ],
}
# (recipe, the variant its work is relative to, the cost-model settings of the docstring)
SETTINGS: dict[str, tuple[str, str, dict[str, float]]] = {
    "baseline": (RECIPE, "baseline", {}),
    "timestep_fraction_1": (RECIPE, "baseline", {"timestep_fraction": 1.0}),
    "timestep_fraction_0.25": (RECIPE, "baseline", {"timestep_fraction": 0.25}),
    "rollout_steps_5": (RECIPE, "baseline", {"steps": 5}),
    "cfg_3": (RECIPE, "baseline", {"guidance": 3.0}),
    "grpo_baseline": (GRPO_RECIPE, "grpo_baseline", {"timestep_fraction": 1.0}),
    "grpo_sde_window_3": (GRPO_RECIPE, "grpo_baseline", {"timestep_fraction": 1.0, "window": 3}),
}
BASE = {"steps": 10, "timestep_fraction": 0.5, "guidance": 1.0}


def work(variant: str) -> float:
    """Denoiser rows of one training step per rollout sample (the cost model of the docstring)."""
    s = {**BASE, **SETTINGS[variant][2]}
    g = 2 if s["guidance"] != 1.0 else 1
    trained = s.get("window") or max(1, int(s["steps"] * s["timestep_fraction"]))
    return s["steps"] * g + 3 * trained * g


def run(variant: str, root: Path, max_epochs: int | None) -> dict:
    from diffalign.core.cli import cli_main

    args = [
        "fit",
        "--config",
        SETTINGS[variant][0],
        "--run_root",
        str(root / variant),
        "--trainer.enable_progress_bar=false",
    ]
    args += ["--trainer.enable_model_summary=false", *VARIANTS[variant]]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    t0, c0 = time.perf_counter(), time.process_time()
    cli = cli_main(args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    n = s["eval_samples"]
    se = math.sqrt((s["reward_before_std"] ** 2 + s["reward_after_std"] ** 2) / n)
    return {
        "variant": variant,
        "recipe": SETTINGS[variant][0],
        "overrides": VARIANTS[variant],
        "reward_before": s["reward_before"],
        "reward_after": s["reward_after"],
        "gain": s["reward_after"] - s["reward_before"],
        "gain_2se": 2 * se,
        "eval_samples": n,
        "optimizer_steps": s["global_step"],
        "reward_queries": s["reward_queries"],
        "train_wall_seconds": s["wall_seconds"],
        "total_wall_seconds": round(wall, 1),
        "total_cpu_seconds": round(cpu, 1),
        "max_epochs": max_epochs or 12,
        "work_per_sample": work(variant),
        "work_relative_to": SETTINGS[variant][1],
        "work_vs_reference": work(variant) / work(SETTINGS[variant][1]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--max-epochs", type=int, default=None, help="override the recipe's 12 epochs")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "speed_tradeoffs_digits.json"
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    command = " ".join(
        ["python", "benchmarks/speed_tradeoffs.py", *(argv if argv is not None else sys.argv[1:])]
    )
    # rows of an earlier run with the same epochs are kept (a variant rerun replaces its row); the JSON is
    # written after every variant, so a run cut short keeps what finished
    old = json.loads(a.out.read_text()).get("rows", []) if a.out.is_file() else []
    rows = [r for r in old if r.get("max_epochs") == (a.max_epochs or 12) and r["variant"] not in a.variants]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variants:
            rows.append(run(v, Path(tmp), a.max_epochs))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            doc = {"command": command, "max_epochs": a.max_epochs or 12, "threads": 1, "rows": rows}
            a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nDDPO / GRPO on the digits ({a.max_epochs or 12} epochs), one override per variant\n")
    print("| variant | recipe | reward before -> after | gain (±2 SE) | work / reference | train wall s |")
    print("|---|---|---|---|---:|---:|")
    for r in sorted(rows, key=lambda r: list(VARIANTS).index(r["variant"])):
        print(
            f"| {r['variant']} | {Path(r['recipe']).stem} | {r['reward_before']:.3f} -> "
            f"{r['reward_after']:.3f} | {r['gain']:+.3f} (±{r['gain_2se']:.3f}) | "
            f"{r['work_vs_reference']:.2f} ({r['work_relative_to']}) | {r['train_wall_seconds']:.0f} |"
        )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
