"""Test-time alignment at equal compute: mean reward vs NFE budget for every method.

    python benchmarks/test_time.py --config recipes/toy/sample_plain.yaml
    python benchmarks/test_time.py --config recipes/image/sample_plain.yaml --budgets 1 2 4 8   # digits
    python benchmarks/test_time.py --config recipes/image/sample_plain.yaml --device cuda

The config is a sampling recipe (policy, reward, prompts, seeds); its `method` is ignored. For each budget m
(in multiples of one plain sample's NFE), each method is sized to spend about m× the NFE of the plain
sampler:
- best-of-N: N = m;  FK steering (DIFF potential, λ = --fk-lambda): K = m particles;
- SVDD: c candidates per step with T + (T−1)·c ≈ m·T;
- reward guidance: 2× by construction with the full window (one extra guided call per step), run at
  m = 2 with the settings of the `sample_guidance.yaml` recipe beside the config (scale 0.5, full window
  if there is none; `--guidance-scale` overrides the scale);
- DNO: s optimisation steps with (2s + 1)·T ≈ m·T (checkpointed backward ≈ one more forward), m ≥ 3.
Each (method, budget) samples the same prompts × seeds. The reported NFE is the measured one. Prints a
markdown table, writes benchmarks/results/test_time_<name>.json and .png (name: `--name`, else the
config's folder, `digits` for recipes/image/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
#: results name per recipe folder, where the folder name says too little
FOLDER_NAMES = {"image": "digits"}  # recipes/image/sample_*.yaml sample the 16x16 digit model


def load_recipe(path: str) -> tuple[object, object, list, int, int]:
    from diffalign.core.recipes import expand_config_args
    from diffalign.core.sample import build_parser

    parser = build_parser()
    cfg = parser.parse_args(expand_config_args(["--config", path])[0])  # the recipe and its bases
    init = parser.instantiate_classes(cfg)
    return init.policy, init.reward, list(cfg.prompts), cfg.seeds_per_prompt, cfg.seed


def guidance_settings(config: str, scale: float | None = None) -> dict:
    """`RewardGuidance` arguments: those of `sample_guidance.yaml` beside `config` if it exists (else
    scale 0.5 over the full window), with `scale` overriding."""
    import yaml

    sibling = Path(config).with_name("sample_guidance.yaml")
    settings: dict = {"scale": 0.5}
    if sibling.is_file():
        method = (yaml.safe_load(sibling.read_text()) or {}).get("method") or {}
        if str(method.get("class_path", "")).endswith("RewardGuidance"):
            settings = dict(method.get("init_args") or {})
    if scale is not None:
        settings["scale"] = scale
    return settings


def methods_for_budget(
    m: int, num_steps: int, fk_lambda: float, dno_lr: float, guidance: dict | None = None
) -> dict[str, object]:
    from diffalign.core.guidance import SVDD, BestOfN, DirectNoiseOptimization, FKSteering, RewardGuidance

    out: dict[str, object] = {
        "best_of_n": BestOfN(m),
        "fk_steering": FKSteering(num_particles=m, lam=fk_lambda),
    }
    if m > 1:
        c = max(2, round((m - 1) * num_steps / max(1, num_steps - 1)))
        out["svdd"] = SVDD(candidates=c)
    if m == 2:
        out["reward_guidance"] = RewardGuidance(**(guidance if guidance is not None else {"scale": 0.5}))
    steps = (m - 1) // 2
    if steps >= 1:
        out["dno"] = DirectNoiseOptimization(steps=steps, lr=dno_lr, reg_weight=1.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "recipes/toy/sample_plain.yaml"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--seeds-per-prompt", type=int, default=None, help="override the recipe's")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--fk-lambda", type=float, default=50.0)
    ap.add_argument("--dno-lr", type=float, default=0.2)
    ap.add_argument(
        "--guidance-scale", type=float, default=None, help="override the sample_guidance.yaml scale"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device of policy and reward (cpu, cuda, cuda:1)")
    ap.add_argument(
        "--name", default=None, help="results name (default: the config's folder; digits for recipes/image)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy, reward, prompts, seeds_per_prompt, seed = load_recipe(args.config)
    seeds_per_prompt = args.seeds_per_prompt or seeds_per_prompt
    device = torch.device(args.device)
    policy.to(device).eval()
    reward.to(device)
    reward.freeze()
    guidance = guidance_settings(args.config, args.guidance_scale)
    from diffalign.core.guidance import PlainSampling
    from diffalign.core.sampling import sample_pairs, seed_pairs

    pairs = seed_pairs(prompts, seeds_per_prompt, seed)

    rows = []
    for m in args.budgets:
        methods = {"plain": PlainSampling()} if m == 1 else {}
        methods.update(methods_for_budget(m, policy.num_steps, args.fk_lambda, args.dno_lr, guidance))
        for name, method in methods.items():
            scores, nfe, start = [], 0.0, time.perf_counter()
            for batch in sample_pairs(policy, pairs, args.batch_size, reward, method):
                scores += batch.scores.tolist()
                nfe += batch.nfe_per_sample * len(batch)
            t = torch.tensor([s for s in scores if math.isfinite(s)])
            rows.append(
                {
                    "method": name,
                    "budget": m,
                    "nfe_per_sample": nfe / len(pairs),
                    "reward_mean": float(t.mean()),
                    "reward_stderr": float(t.std() / math.sqrt(len(t))),
                    "samples": len(t),
                    "wall_seconds": round(time.perf_counter() - start, 2),
                }
            )
            print(
                f"budget {m}x {name:16s} reward {rows[-1]['reward_mean']:.4f} "
                f"± {rows[-1]['reward_stderr']:.4f}  NFE {rows[-1]['nfe_per_sample']:.1f}",
                file=sys.stderr,
            )
    folder = Path(args.config).resolve().parent.name
    name = args.name or FOLDER_NAMES.get(folder, folder)
    lines = [
        "| method | budget | NFE / sample | mean reward ± s.e. | samples | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['budget']}× | {r['nfe_per_sample']:.0f} | {r['reward_mean']:.4f} ± "
        f"{r['reward_stderr']:.4f} | {r['samples']} | {r['wall_seconds']} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": args.config,
        "reward": reward.name,
        "num_steps": policy.num_steps,
        "prompts": len(prompts),
        "seeds_per_prompt": seeds_per_prompt,
        "fk_lambda": args.fk_lambda,
        "dno_lr": args.dno_lr,
        "guidance": guidance,
        "torch": torch.__version__,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
    }
    (out_dir / f"test_time_{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["nfe_per_sample"], r["reward_mean"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoiser evaluations per sample (NFE)")
    ax.set_ylabel(f"mean {reward.name}")
    ax.set_title(f"test-time alignment vs compute ({name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"test_time_{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
