"""`diffalign sample --config recipes/<modality>/sample_<method>.yaml`: test-time alignment from a recipe.

A sampling recipe names a policy (backbone + kernel), a reward, a `TestTimeMethod`, and the conditions
and seeds to sample; optionally a Lightning checkpoint of an aligned run (`ckpt_path`) whose policy
weights are loaded first. It writes into the output folder:

- results.json: per-sample prompt, seed, reward and NFE, plus the mean reward, NFE per sample, wall time;
- samples.pt: the model-space samples with their prompts and seeds;
- the modality's own files when the backbone defines
  `save_samples(samples, folder, prompts, start_index=...)` (e.g. image grids).

Randomness follows the project's seeding rule (`core.sampling`): each (prompt, seed) pair has its own
generator, so a row's sample is the same at any `batch_size`, and `PlainSampling` reproduces exactly the
samples the evaluation of a training run (and `diffalign predict`) draws for the same pair.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def build_parser(require_method: bool = True) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from diffalign.core.guidance.base import TestTimeMethod
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.reward import Reward

    parser = ArgumentParser(prog="diffalign sample", description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="sampling recipe (YAML)")
    parser.add_subclass_arguments(DiffusionPolicy, "policy", required=True)
    parser.add_subclass_arguments(Reward, "reward", required=True)
    if require_method:
        parser.add_subclass_arguments(TestTimeMethod, "method", required=True)
    parser.add_argument(
        "--prompts", type=list[str | int | dict[str, Any]], required=True, help="conditions to sample"
    )
    parser.add_argument("--seeds_per_prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=10_000, help="first seed")
    parser.add_argument("--batch_size", type=int, default=16, help="conditions per batch")
    parser.add_argument(
        "--ckpt_path", type=str | None, default=None, help="AlignmentModule checkpoint to load"
    )
    parser.add_argument(
        "--output", type=str | None, default=None, help="output folder (default samples/<recipe>)"
    )
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def load_policy_weights(policy: torch.nn.Module, ckpt_path: str) -> None:
    """Load the `policy.*` weights of an AlignmentModule checkpoint into `policy` (non-strict: frozen
    weights left out of LoRA checkpoints stay as built)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    sub = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
    if not sub:
        raise ValueError(f"{path} holds no policy.* weights (is it an AlignmentModule checkpoint?)")
    missing, unexpected = policy.load_state_dict(sub, strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights that do not fit the policy: {unexpected[:5]}")


def run_sampling(
    policy: Any,
    reward: Any,
    method: Any,
    prompts: Sequence[Any],
    seeds_per_prompt: int,
    seed: int,
    batch_size: int,
    output: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample every (prompt, seed) pair with `method`, write the outputs, return the summary."""
    from diffalign.core.io import atomic_write, write_json
    from diffalign.core.sampling import finite_mean, sample_pairs, seed_pairs

    pairs = seed_pairs(prompts, seeds_per_prompt, seed)
    output.mkdir(parents=True, exist_ok=True)
    policy.eval()
    reward.freeze()
    rows, all_x0, nfe_total = [], [], 0.0
    start = time.perf_counter()
    saver = getattr(policy.backbone, "save_samples", None)
    done = 0
    desc = f"sampling ({type(method).__name__})"
    for batch in sample_pairs(policy, pairs, batch_size, reward, method, progress=progress, desc=desc):
        chunk = pairs[done : done + len(batch)]
        all_x0.append(batch.x0.cpu())
        nfe_total += batch.nfe_per_sample * len(batch)
        for (p, s), r in zip(chunk, batch.scores.tolist(), strict=True):
            rows.append({"prompt": p, "seed": s, "reward": r, "nfe": batch.nfe_per_sample})
        if saver is not None:
            saver(batch.samples(), output, [p for p, _ in chunk], start_index=done)
        done += len(batch)
    finite = [r["reward"] for r in rows if math.isfinite(r["reward"])]
    summary = {
        "method": type(method).__name__,
        "reward_name": reward.name,
        "reward_mean": finite_mean(finite),
        "samples": len(rows),
        "failed": len(rows) - len(finite),
        "nfe_per_sample": nfe_total / max(1, len(rows)),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "rows": rows,
    }
    write_json(output / "results.json", summary)
    x0 = torch.cat(all_x0)
    atomic_write(
        output / "samples.pt",
        lambda p: torch.save(
            {"x0": x0, "prompts": [r["prompt"] for r in rows], "seeds": [r["seed"] for r in rows]}, p
        ),
    )
    return summary


def main(argv: Sequence[str]) -> int:
    """Entry point of `diffalign sample`."""
    from jsonargparse import ArgumentError

    from diffalign.core.cli import explain_config_error
    from diffalign.core.recipes import expand_config_args

    argv, names = expand_config_args(argv)  # recipe names and `bases:` -> several --config
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as e:
        print(explain_config_error(str(e), names[::-1], argv), file=sys.stderr)
        return 2
    init = parser.instantiate_classes(cfg)
    policy, reward, method = init.policy, init.reward, init.method
    if cfg.ckpt_path:
        load_policy_weights(policy, cfg.ckpt_path)
    device = torch.device(cfg.device)
    policy.to(device)
    reward.to(device)
    output = Path(cfg.output) if cfg.output else Path("samples") / (Path(names[-1]).stem if names else "run")
    summary = run_sampling(
        policy,
        reward,
        method,
        cfg.prompts,
        cfg.seeds_per_prompt,
        cfg.seed,
        cfg.batch_size,
        output,
        cfg.progress,
    )
    mean = "n/a (every reward failed)" if summary["reward_mean"] is None else f"{summary['reward_mean']:.4f}"
    print(
        f"{summary['method']}: mean {summary['reward_name']} {mean} over "
        f"{summary['samples']} samples, {summary['nfe_per_sample']:.1f} NFE per sample, "
        f"{summary['wall_seconds']:.1f} s -> {output / 'results.json'}"
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0
