"""Which denoising steps a moving-digit alignment run's gain comes from: the evaluation set sampled with the
aligned network on some steps and the base network on the others.

    python benchmarks/video_grpo_step_swap.py RUN_DIR                    # variants: all, 0-1, 2-9
    python benchmarks/video_grpo_step_swap.py RUN_DIR --steps 0 0-2 3-9 --eval-seeds 4

RUN_DIR is a `diffalign fit` run folder (`benchmarks/video_alignment.py --run-root` keeps them): its
config.yaml gives the policy, the base weights and the evaluation prompts, checkpoints/last.ckpt the aligned
weights. GRPO with an SDE window trains only the window's steps, but those steps' weights are every step's
weights: this separates what the update does at the trained steps from what it does elsewhere.

Each variant samples the same (prompt, seed) pairs with the same per-pair noise as the base (the seeding
rule), the aligned network's output replacing the base's at the variant's steps; every video metric of
`video_alignment.clip_values` is reported as a paired gain over the base ± 2 SE. Prints a table, writes
benchmarks/results/video_grpo_step_swap.json (one row per run folder and variant).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import paired_gains, save_rows  # noqa: E402
from video_alignment import _base_policy, _start_weights, policy_values  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "video_grpo_step_swap.json"
SHOWN = (
    "motion_agreement",
    "motion_classifier",
    "frame_digit_fidelity",
    "temporal_flicker",
    "motion_px",
    "pixel_mean",
)


def parse_steps(spec: str, num_steps: int) -> frozenset[int]:
    """'all', 'none', 'k' or 'a-b' (inclusive) → the set of step indices the aligned network runs."""
    if spec == "all":
        return frozenset(range(num_steps))
    if spec == "none":
        return frozenset()
    lo, _, hi = spec.partition("-")
    steps = frozenset(range(int(lo), int(hi or lo) + 1))
    if not steps or max(steps) >= num_steps:
        raise ValueError(f"steps {spec!r}: the policy samples steps 0-{num_steps - 1}")
    return steps


def load_run(run: Path, eval_seeds: int | None) -> tuple[torch.nn.Module, list]:
    """The run's policy with its aligned weights, and its evaluation (prompt, seed) pairs."""
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser

    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sample import load_policy_weights

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionPolicy, "policy")
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    data = cfg["data"]
    if eval_seeds:
        data = {**data, "init_args": {**data["init_args"], "eval_seeds_per_prompt": eval_seeds}}
    built = parser.instantiate_classes(
        parser.parse_object({"policy": cfg["model"]["init_args"]["policy"], "data": data})
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    load_policy_weights(built.policy, str(ckpt))
    return built.policy, built.data.evaluation_set()


def swapped(aligned: torch.nn.Module, base: torch.nn.Module, steps: frozenset[int]) -> torch.nn.Module:
    """`base` whose denoiser output at `steps` is the aligned network's (same kernel, same noise)."""
    import copy

    policy = copy.deepcopy(base)
    index: dict[float, int] = {}

    def model_output(x, t, cond, mask=None):
        if not index:  # the schedule's timesteps → step index, from the first call's device
            index.update({float(v): i for i, v in enumerate(base._timesteps(x.device, base.num_steps))})
        net = aligned if index[float(t[0])] in steps else base
        return net.model_output(x, t, cond, mask)

    policy.model_output = model_output
    return policy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders")
    ap.add_argument("--steps", nargs="+", default=["all", "0-1", "2-9"], help="variants: all, none, k, a-b")
    ap.add_argument("--eval-seeds", type=int, default=None, help="seeds per prompt (default: the run's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    rows = []
    for run in args.runs:
        aligned, pairs = load_run(run, args.eval_seeds)
        base = _base_policy(aligned, _start_weights(run))
        t0 = time.process_time()
        before = policy_values(base, pairs)
        for spec in args.steps:
            steps = parse_steps(spec, aligned.num_steps)
            after = policy_values(swapped(aligned, base, steps), pairs)
            gains = paired_gains(before, after)
            rows.append(
                {
                    "key": f"{run}:{spec}",
                    "run_dir": str(run),
                    "aligned_steps": spec,
                    "eval_samples": len(pairs),
                    "base": {k: sum(v) / len(v) for k, v in before.items()},
                    "paired_gain": gains,
                    "cpu_seconds_so_far": round(time.process_time() - t0, 1),  # since the run's base
                }
            )
            print(f"{run} aligned on {spec}: done", flush=True)
    print("| run | aligned steps | " + " | ".join(SHOWN) + " |")
    print("|---|---|" + "---|" * len(SHOWN))
    for r in rows:
        cells = [f"{r['paired_gain'][k][0]:+.3f} ± {2 * r['paired_gain'][k][1]:.3f}" for k in SHOWN]
        print(f"| {r['run_dir']} | {r['aligned_steps']} | " + " | ".join(cells) + " |")
    save_rows(OUT, "step_swap", rows)
    print(json.dumps({"written": str(OUT), "rows": len(rows)}))


if __name__ == "__main__":
    main()
