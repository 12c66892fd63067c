"""`diffalign sample --config recipes/<modality>/sample_<method>.yaml`: test-time alignment from a recipe.

A sampling recipe names a policy (backbone + kernel), a reward, a `TestTimeMethod`, and the conditions
and seeds to sample; optionally a Lightning checkpoint of an aligned run (`ckpt_path`) whose policy
weights are loaded first. It writes into the output folder:

- results.json: per-sample prompt, seed, reward and NFE, plus the mean reward, NFE per sample, wall time;
- samples.pt: the model-space samples with their prompts and seeds;
- the modality's own files when the backbone defines
  `save_samples(samples, folder, prompts, start_index=...)` (e.g. image grids).

Randomness: one generator per batch, seeded by the batch's first (prompt, seed) pair; a row's `seed` in
results.json identifies it, and results are reproducible for the same recipe and `batch_size` (changing
`batch_size` changes which noise each row gets).
"""

from __future__ import annotations

import json
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
    parser.add_argument("--prompts", type=list[str | int], required=True, help="conditions to sample")
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
    from tqdm.auto import tqdm

    pairs = [(p, seed + 1000 * i + j) for i, p in enumerate(prompts) for j in range(seeds_per_prompt)]
    output.mkdir(parents=True, exist_ok=True)
    policy.eval()
    reward.freeze()
    rows, all_x0, nfe_total = [], [], 0.0
    start = time.perf_counter()
    bar = tqdm(
        total=len(pairs), desc=f"sampling ({type(method).__name__})", disable=not progress, file=sys.stderr
    )
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        batch_prompts = [p for p, _ in chunk]
        cond = policy.backbone.encode_condition({"prompt": batch_prompts})
        result = method(policy, cond, reward, torch.Generator().manual_seed(int(chunk[0][1])))
        all_x0.append(result.x0.cpu())
        nfe_total += result.nfe_per_sample * len(chunk)
        for (p, s), r in zip(chunk, result.scores.tolist(), strict=True):
            rows.append({"prompt": p, "seed": s, "reward": r, "nfe": result.nfe_per_sample})
        saver = getattr(policy.backbone, "save_samples", None)
        if saver is not None:
            saver(result.samples, output, batch_prompts, start_index=b)
        bar.update(len(chunk))
    bar.close()
    finite = [r["reward"] for r in rows if r["reward"] == r["reward"] and abs(r["reward"]) != float("inf")]
    summary = {
        "method": type(method).__name__,
        "reward_name": reward.name,
        "reward_mean": sum(finite) / len(finite) if finite else None,
        "samples": len(rows),
        "failed": len(rows) - len(finite),
        "nfe_per_sample": nfe_total / max(1, len(rows)),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "rows": rows,
    }
    from diffalign.core.io import atomic_write, write_json

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

    from diffalign.core.cli import _check_config_files, _config_names, explain_config_error

    _check_config_files(argv)
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as e:
        print(explain_config_error(str(e), _config_names(argv), argv), file=sys.stderr)
        return 2
    init = parser.instantiate_classes(cfg)
    policy, reward, method = init.policy, init.reward, init.method
    if cfg.ckpt_path:
        load_policy_weights(policy, cfg.ckpt_path)
    device = torch.device(cfg.device)
    policy.to(device)
    reward.to(device)
    names = _config_names(argv)
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
