"""Image alignment on CPU: reward of the base vs the DDPO-aligned digit model over fixed (prompt, seed) pairs.

    python benchmarks/image_alignment.py                       # digit fidelity and compressibility
    python benchmarks/image_alignment.py --tasks digit_fidelity --max-epochs 10

Each task runs its recipe through the CLI (`diffalign fit`, in-process) into a temporary run folder and
reads `summary.json`: reward before/after over the recipe's evaluation set (10 digit prompts × 26 seeds
= 260 fixed pairs), reward queries and wall time. It also measures, on the same pairs, how often the
digit classifier agrees with the prompt (prompt-following rate) for the base and the aligned model,
and the mean JPEG size. Prints a markdown table and writes benchmarks/results/image_alignment.json
(rows of tasks not run this time are kept, so tasks can be run one at a time).
"""

from __future__ import annotations

import argparse
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
    "digit_fidelity": "recipes/image/ddpo_digit_fidelity.yaml",
    "compressibility": "recipes/image/ddpo_compressibility.yaml",
    "incompressibility": "recipes/image/ddpo_incompressibility.yaml",
}


@torch.no_grad()
def side_metrics(module, pairs: list[tuple[str, int]], batch_size: int = 64) -> dict[str, float]:
    """Classifier agreement with the prompt and mean JPEG size (kB) of the policy's samples on `pairs`."""
    from diffalign.core.sampling import sample_pairs
    from diffalign.rewards.image import DigitFidelity, jpeg_sizes_kb

    fidelity = DigitFidelity()
    policy = module.policy
    policy.eval()
    agree, prob, kb = [], [], []
    for batch in sample_pairs(policy, pairs, batch_size, reward=fidelity):
        agree.append(batch.scored.info["digit_accuracy"])
        prob.append(batch.scores)
        kb.append(jpeg_sizes_kb(batch.samples()))
    return {
        "prompt_following": torch.cat(agree).mean().item(),
        "digit_probability": torch.cat(prob).mean().item(),
        "jpeg_kb": torch.cat(kb).mean().item(),
    }


def run_task(name: str, extra: list[str], run_root: Path) -> dict:
    from diffalign.core.cli import cli_main

    recipe = TASKS[name]
    args = ["fit", "--config", str(REPO / recipe), "--run_root", str(run_root)]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]
    t0 = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "summary.json").read_text())
    pairs = cli.datamodule.evaluation_set()
    after = side_metrics(cli.model, pairs)
    # the base model: the aligned module with the recipe's starting weights loaded back, same sampler
    import copy

    from diffalign.core.io import load_state_dict

    base = copy.deepcopy(cli.model)
    load_state_dict(base.policy.backbone, _backbone_weights(run))
    before = side_metrics(base, pairs)
    n = summary["eval_samples"]
    se = math.sqrt(summary["reward_before_std"] ** 2 / n + summary["reward_after_std"] ** 2 / n)
    return {
        "task": name,
        "recipe": recipe,
        "reward": summary["reward_name"],
        "reward_before": summary["reward_before"],
        "reward_after": summary["reward_after"],
        "gain": summary["reward_after"] - summary["reward_before"],
        "gain_standard_error": se,
        "eval_samples": n,
        "reward_queries": summary["reward_queries"],
        "train_wall_seconds": summary["wall_seconds"],
        "total_wall_seconds": round(wall, 1),
        "optimizer_steps": summary["global_step"],
        "prompt_following_before": before["prompt_following"],
        "prompt_following_after": after["prompt_following"],
        "digit_probability_before": before["digit_probability"],
        "digit_probability_after": after["digit_probability"],
        "jpeg_kb_before": before["jpeg_kb"],
        "jpeg_kb_after": after["jpeg_kb"],
        "run_dir": str(run),
    }


def _backbone_weights(run: Path) -> str:
    """The `weights` the run's backbone started from (resolved config.yaml)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    args = cfg["model"]["init_args"]["policy"]["init_args"]["backbone"].get("init_args") or {}
    if not args.get("weights"):
        raise ValueError(f"{run / 'config.yaml'}: the backbone has no `weights` to compare against")
    return args["weights"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tasks = ["digit_fidelity", "compressibility"]
    ap.add_argument("--tasks", nargs="+", default=default_tasks, choices=sorted(TASKS))
    ap.add_argument("--max-epochs", type=int, default=None, help="override the recipes' trainer.max_epochs")
    ap.add_argument("--out", default=str(RESULTS / "image_alignment.json"))
    ap.add_argument("overrides", nargs="*", help="extra `diffalign fit` arguments (after --)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extra = [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    extra += list(args.overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            rows.append(run_task(name, extra, Path(tmp)))
    head = (
        "| task | reward | before | after | gain (±2 SE) | prompt-following before → after | "
        "P(prompted digit) before → after | "
        "JPEG kB before → after | samples | reward queries | wall s |"
    )
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['task']} | {r['reward']} | {r['reward_before']:.4f} | {r['reward_after']:.4f} | "
            f"{r['gain']:+.4f} (±{2 * r['gain_standard_error']:.4f}) | "
            f"{r['prompt_following_before']:.3f} → {r['prompt_following_after']:.3f} | "
            f"{r['digit_probability_before']:.3f} → {r['digit_probability_after']:.3f} | "
            f"{r['jpeg_kb_before']:.3f} → {r['jpeg_kb_after']:.3f} | {r['eval_samples']} | "
            f"{r['reward_queries']} | {r['train_wall_seconds']:.0f} |"
        )
    for r in rows:
        r.pop("run_dir")
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for r in rows:
        r.update(machine=machine, max_epochs_override=args.max_epochs, overrides=list(args.overrides))
    out_path = Path(args.out)
    kept = []
    if out_path.is_file():  # rows of tasks not rerun now are kept (tasks can be run one at a time)
        ran = {r["task"] for r in rows}
        kept = [r for r in json.loads(out_path.read_text()).get("rows", []) if r.get("task") not in ran]
    out = {"rows": sorted(kept + rows, key=lambda r: list(TASKS).index(r["task"]))}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
