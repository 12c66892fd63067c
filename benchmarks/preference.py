"""Preference alignment of the digit model: each aligned model's win rate against the base (DigitFidelity).

Win rates are judged by DigitFidelity over fixed (prompt, seed) pairs; a Bradley–Terry reward model's
held-out pair accuracy is reported too.

    python benchmarks/preference.py                                  # everything, CPU
    python benchmarks/preference.py --device cuda
    python benchmarks/preference.py --methods dpo kto --quick        # tiny sizes: checks the script runs

Steps, all from the recipes under recipes/image/ and through the code `diffalign` runs:

1. AI feedback (`diffalign feedback`'s parser and `make_preference_dataset`): pairs ranked by
   DigitFidelity (`feedback_digit_fidelity.yaml`, for DPO and the reward model) and good/bad labelled
   samples (`feedback_digit_fidelity_unpaired.yaml`, for KTO), written to the work folder.
2. `reward_model`: `diffalign fit` of `reward_model_digits.yaml` (Bradley–Terry CNN); reports its pair
   accuracy on the held-out pairs (`val_fraction`) and, on the base model's evaluation samples, how
   often it orders two samples of the same prompt as DigitFidelity does.
3. Each method: `diffalign fit` of its recipe (in-process, `cli_main`) — `dpo` (offline Diffusion-DPO),
   `kto` (Diffusion-KTO), `spo`, `d3po` (online, DigitFidelity as judge) and `ddpo_learned` (DDPO on
   the learned CNN reward, so DigitFidelity is never queried in training).
4. Evaluation: for every (prompt, seed) of the 10 digit prompts × `--eval-seeds-per-prompt` seeds
   (seeds 10000 + 1000·i + j, the recipes' evaluation set), the aligned and the base model sample
   from the same initial noise with the recipe's sampler; the aligned sample wins when DigitFidelity
   scores it higher (ties count half). Reported: win rate ± its binomial standard error
   √(p(1 − p)/n), mean DigitFidelity before/after (± the SE of the paired mean difference), and
   prompt-following (classifier's argmax = prompted digit) before/after.

Prints a markdown table and writes benchmarks/results/preference_digits.json (`--quick`:
preference_digits_quick.json); rows of methods not run this time are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RECIPES = REPO / "recipes" / "image"
FEEDBACK = {"pairs": "feedback_digit_fidelity", "unpaired": "feedback_digit_fidelity_unpaired"}
REWARD_MODEL = "reward_model_digits"
METHODS = {  # method -> (recipe, feedback it trains on or None, needs the learned reward, training signal)
    "dpo": ("dpo_digit_fidelity", "pairs", False, "offline pairs ranked by DigitFidelity"),
    "kto": ("kto_digit_fidelity", "unpaired", False, "offline good/bad labels from DigitFidelity"),
    "spo": ("spo_digit_fidelity", None, False, "online step pairs judged by DigitFidelity"),
    "d3po": ("d3po_digit_fidelity", None, False, "online pairs judged by DigitFidelity"),
    "ddpo_learned": ("ddpo_learned_digits", None, True, "online, the learned BT reward"),
}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


# -- settings ---------------------------------------------------------------------------------------
def quick_overrides(recipe: str) -> list[str]:
    """Tiny sizes for --quick: 4 sampling steps, 2 optimiser steps of small batches."""
    out = ["--model.init_args.policy.init_args.num_steps=4"] if recipe != REWARD_MODEL else []
    out += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.max_steps=2"]
    out += ["--data.init_args.batch_size=8"]
    if recipe in ("spo_digit_fidelity", "d3po_digit_fidelity", "ddpo_learned_digits"):
        out += ["--data.init_args.batches_per_epoch=2"]
    if recipe == "ddpo_learned_digits":  # DDPO's per-prompt advantage statistics need a few samples
        out += ["--model.init_args.algorithm.init_args.per_prompt_min_count=2", "--trainer.callbacks=[]"]
    return out


def device_overrides(device: str) -> list[str]:
    return ["--trainer.accelerator=gpu", "--trainer.devices=1"] if device == "cuda" else []


# -- steps ------------------------------------------------------------------------------------------
def make_feedback(layout: str, work: Path, device: str, quick: bool, reuse: bool = False) -> dict[str, Any]:
    """`diffalign feedback --config recipes/image/<recipe>.yaml` into work/feedback/<recipe>, on `device`
    (the same parser and `make_preference_dataset`; the CLI itself samples on the CPU)."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.recipes import expand_config_args
    from diffalign.core.sample import build_parser

    name = FEEDBACK[layout]
    folder = work / "feedback" / name
    if reuse and (folder / "pairs.jsonl").is_file():
        rows = sum(1 for line in (folder / "pairs.jsonl").open() if line.strip())
        print(f"feedback {name}: reusing {rows} rows in {folder}")
        return {"rows": rows, "recipe": f"recipes/image/{name}.yaml", "reused": True}
    parser = build_parser(require_method=False)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--pairs_per_prompt", type=int, default=1)
    parser.add_argument("--layout", type=str, default="pairs")
    argv = ["--config", str(RECIPES / f"{name}.yaml")]
    if quick:
        argv += ["--seeds_per_prompt=2", "--policy.init_args.num_steps=4"]
    cfg = parser.parse_args(expand_config_args(argv)[0])  # the recipe and its bases
    if cfg.layout != layout:
        raise ValueError(f"{name}.yaml writes layout {cfg.layout!r}, expected {layout!r}")
    init = parser.instantiate_classes(cfg)
    policy, reward = init.policy.to(device), init.reward.to(device)
    prompts = [p for p in cfg.prompts for _ in range(cfg.seeds_per_prompt)]
    t0 = time.perf_counter()
    result = make_preference_dataset(
        policy,
        reward,
        prompts,
        folder,
        cfg.samples_per_prompt,
        cfg.pairs_per_prompt,
        cfg.seed,
        cfg.batch_size,
        cfg.layout,
    )
    result["file"] = str(Path(result["file"]).relative_to(work))
    result.update(recipe=f"recipes/image/{name}.yaml", wall_seconds=round(time.perf_counter() - t0, 1))
    print(f"feedback {name}: {result['rows']} rows ({result['skipped']} skipped), {result['wall_seconds']} s")
    return result


def fit(recipe: str, work: Path, overrides: list[str]) -> Any:
    """`diffalign fit --config recipes/image/<recipe>.yaml <overrides>` in-process; returns the CLI."""
    from diffalign.core.cli import cli_main

    args = ["fit", "--config", str(RECIPES / f"{recipe}.yaml"), "--run_root", str(work / "runs"), *QUIET]
    return cli_main(args + overrides)


@contextlib.contextmanager
def _ema(module: Any):
    ema = getattr(module, "ema_weights", None)
    with ema() if ema is not None else contextlib.nullcontext():
        yield


@torch.no_grad()
def sample_and_judge(policy: Any, pairs: list[tuple[str, int]], device: str, batch_size: int = 128) -> dict:
    """DigitFidelity scores, prompt-following and the images of `policy`'s samples on `pairs` (one
    generator per (prompt, seed): the project's one sampling path, `core.sampling`)."""
    from diffalign.core.sampling import sample_pairs
    from diffalign.rewards.image import DigitFidelity

    judge = DigitFidelity().to(device)
    was_training = policy.training
    policy.eval()
    scores, correct, images = [], [], []
    try:
        for batch in sample_pairs(policy, pairs, batch_size, reward=judge):
            scores.append(batch.scores.float().cpu())
            correct.append(batch.scored.info["digit_accuracy"].float().cpu())
            images.append(batch.samples().float().cpu())
    finally:
        policy.train(was_training)
    return {"scores": torch.cat(scores), "correct": torch.cat(correct), "images": torch.cat(images)}


def _sampler_key(policy: Any) -> tuple:
    k = policy.kernel
    return (type(k).__name__, getattr(k, "eta", None), policy.num_steps)


def base_samples(module: Any, run: Path, pairs: list, device: str, cache: dict) -> dict:
    """The base model (the module with its recipe's starting weights loaded back), same sampler."""
    key = _sampler_key(module.policy)
    if key not in cache:
        import yaml

        from diffalign.core.io import load_state_dict

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        args = cfg["model"]["init_args"]["policy"]["init_args"]["backbone"].get("init_args") or {}
        from diffalign.modalities.image import BASE_WEIGHTS

        base = copy.deepcopy(module.policy).to(device)
        load_state_dict(base.backbone, args.get("weights") or BASE_WEIGHTS)
        cache[key] = sample_and_judge(base, pairs, device)
    return cache[key]


def compare(aligned: dict, base: dict) -> dict[str, Any]:
    """Win rate of aligned over base sample by sample (ties half), with a binomial SE, and the means."""
    a, b = aligned["scores"], base["scores"]
    n = len(a)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    p = (wins + 0.5 * ties) / n
    diff = a - b
    return {
        "eval_pairs": n,
        "win_rate": p,
        "win_rate_se": math.sqrt(p * (1 - p) / n),
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "reward_before": b.mean().item(),
        "reward_after": a.mean().item(),
        "reward_gain": diff.mean().item(),
        "reward_gain_se": (diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan"),
        "prompt_following_before": base["correct"].mean().item(),
        "prompt_following_after": aligned["correct"].mean().item(),
    }


def run_reward_model(work: Path, device: str, quick: bool, extra: list[str]) -> dict:
    export = work / "reward_models" / "digits_bt.safetensors"
    overrides = [
        f"--data.init_args.path={work / 'feedback' / FEEDBACK['pairs'] / 'pairs.jsonl'}",
        f"--model.init_args.export_path={export}",
        *device_overrides(device),
        *(quick_overrides(REWARD_MODEL) if quick else []),
        *extra,
    ]
    t0 = time.perf_counter()
    cli = fit(REWARD_MODEL, work, overrides)
    wall = time.perf_counter() - t0
    net = cli.model.network.cpu().eval()
    rows = cli.datamodule.val_rows
    with torch.no_grad():
        prompts = [r["prompt"] for r in rows]
        s_w = net(torch.stack([r["winner"] for r in rows]).float(), prompts)
        s_l = net(torch.stack([r["loser"] for r in rows]).float(), prompts)
    acc = (s_w > s_l).float().mean().item()
    print(f"reward model: held-out pair accuracy {acc:.3f} over {len(rows)} pairs")
    return {
        "recipe": f"recipes/image/{REWARD_MODEL}.yaml",
        "held_out_pairs": len(rows),
        "held_out_pair_accuracy": acc,
        "held_out_pair_accuracy_se": math.sqrt(acc * (1 - acc) / len(rows)),
        "train_pairs": len(cli.datamodule.dataset),
        "optimizer_steps": int(cli.trainer.global_step),
        "total_wall_seconds": round(wall, 1),
        "export": str(export),
    }


def order_agreement(weights: str, pairs: list, base: dict) -> dict[str, Any]:
    """How often the learned reward orders two base samples of one prompt as DigitFidelity does."""
    from diffalign.core.io import load_state_dict
    from diffalign.rewards.image import DigitScorer

    net = DigitScorer()
    load_state_dict(net, weights)
    with torch.no_grad():
        learned = net.eval()(base["images"], [p for p, _ in pairs])
    agree = total = 0
    for prompt in dict.fromkeys(p for p, _ in pairs):
        idx = torch.tensor([i for i, (p, _) in enumerate(pairs) if p == prompt])
        i, j = torch.triu_indices(len(idx), len(idx), 1)
        d_judge = base["scores"][idx[i]] - base["scores"][idx[j]]
        d_learned = learned[idx[i]] - learned[idx[j]]
        keep = d_judge != 0
        agree += int(((d_judge > 0) == (d_learned > 0))[keep].sum())
        total += int(keep.sum())
    return {"base_sample_order_agreement": agree / max(1, total), "base_sample_order_pairs": total}


def run_method(
    name: str, work: Path, device: str, quick: bool, pairs: list, cache: dict, extra: list[str]
) -> dict:
    recipe, layout, learned, signal = METHODS[name]
    overrides = [f"--data.init_args.eval_seeds_per_prompt={len(pairs) // 10}"]
    if layout is not None:
        overrides.append(f"--data.init_args.path={work / 'feedback' / FEEDBACK[layout] / 'pairs.jsonl'}")
    if learned:
        weights = work / "reward_models" / "digits_bt.safetensors"
        overrides.append(f"--model.init_args.reward.init_args.weights={weights}")
    overrides += device_overrides(device) + (quick_overrides(recipe) if quick else []) + extra
    t0 = time.perf_counter()
    cli = fit(recipe, work, overrides)
    wall = time.perf_counter() - t0
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "summary.json").read_text())
    module = cli.model.to(device)
    with _ema(module):
        aligned = sample_and_judge(module.policy, pairs, device)
    base = base_samples(module, run, pairs, device, cache)
    row = {"method": name, "recipe": f"recipes/image/{recipe}.yaml", "training_signal": signal}
    row["algorithm"] = type(module.algorithm).__name__
    row.update(compare(aligned, base))
    row.update(
        {
            "run_reward": summary.get("reward_name"),
            "reward_queries": summary.get("reward_queries"),
            "optimizer_steps": summary.get("global_step"),
            "train_wall_seconds": summary.get("wall_seconds"),
            "total_wall_seconds": round(wall, 1),
        }
    )
    print(f"{name}: win rate {row['win_rate']:.3f} ± {row['win_rate_se']:.3f} over {row['eval_pairs']} pairs")
    return row


# -- report -----------------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: list[dict], rm: dict | None) -> None:
    head = (
        "| method | training signal | win rate vs base (± SE) | W / T / L | DigitFidelity before → after "
        "(gain ± SE) | prompt-following before → after | reward queries | steps | wall s |"
    )
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['method']} | {r['training_signal']} | {r['win_rate']:.3f} (± {r['win_rate_se']:.3f}) | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | {r['reward_before']:.3f} → {r['reward_after']:.3f} "
            f"({r['reward_gain']:+.3f} ± {r['reward_gain_se']:.3f}) | "
            f"{r['prompt_following_before']:.3f} → {r['prompt_following_after']:.3f} | "
            f"{r['reward_queries']} | {r['optimizer_steps']} | {r['total_wall_seconds']:.0f} |"
        )
    if rm:
        line = (
            f"\nreward model ({rm['recipe']}): held-out pair accuracy {rm['held_out_pair_accuracy']:.3f} "
            f"(± {rm['held_out_pair_accuracy_se']:.3f}) over {rm['held_out_pairs']} pairs"
        )
        if "base_sample_order_agreement" in rm:
            line += (
                f"; orders same-prompt base samples as DigitFidelity does in "
                f"{rm['base_sample_order_agreement']:.3f} of {rm['base_sample_order_pairs']} pairs"
            )
        print(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    ap.add_argument(
        "--no-reward-model", action="store_true", help="skip the reward model (unless ddpo_learned runs)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script works")
    ap.add_argument("--eval-seeds-per-prompt", type=int, default=None, help="default 26 (260 pairs); quick 2")
    ap.add_argument("--workdir", default=None, help="keep feedback, runs, weights here (default: temp dir)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/preference_digits[_quick].json")
    ap.add_argument("--reuse-feedback", action="store_true", help="keep feedback already in --workdir")
    ap.add_argument(
        "overrides", nargs="*", help="extra `diffalign fit` arguments for every method's recipe (after --)"
    )
    ap.add_argument(
        "--rm-override", action="append", default=[], help="extra argument for the reward model fit"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # in-process fit, on purpose

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    seeds = args.eval_seeds_per_prompt or (2 if args.quick else 26)
    from diffalign.modalities.image import DIGIT_PROMPTS

    pairs = [(p, 10_000 + 1000 * i + j) for i, p in enumerate(DIGIT_PROMPTS) for j in range(seeds)]
    methods = [m for m in METHODS if m in args.methods]
    want_rm = not args.no_reward_model or "ddpo_learned" in methods
    layouts = {METHODS[m][1] for m in methods if METHODS[m][1]} | ({"pairs"} if want_rm else set())
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = None if args.workdir else stack.enter_context(tempfile.TemporaryDirectory())
        work = Path(args.workdir or tmp)
        feedback = {
            FEEDBACK[k]: make_feedback(k, work, args.device, args.quick, args.reuse_feedback)
            for k in sorted(layouts)
        }
        cache: dict = {}
        rm = run_reward_model(work, args.device, args.quick, args.rm_override) if want_rm else None
        extra = list(args.overrides)
        rows = [run_method(m, work, args.device, args.quick, pairs, cache, extra) for m in methods]
        if rm is not None and cache:  # on the base samples the methods were compared against
            rm.update(order_agreement(rm["export"], pairs, next(iter(cache.values()))))
        if rm is not None:
            rm["export"] = str(Path(rm["export"]).relative_to(work))
    print_table(rows, rm)
    info = machine(args.device)
    settings = {
        "quick": args.quick,
        "eval_pairs": len(pairs),
        "eval_seeds_per_prompt": seeds,
        "total_wall_seconds": round(time.perf_counter() - t_start, 1),
        "overrides": list(args.overrides),
        "reward_model_overrides": list(args.rm_override),
    }
    out_path = Path(args.out or RESULTS / f"preference_digits{'_quick' if args.quick else ''}.json")
    kept, kept_rm = [], None
    if out_path.is_file():  # rows of methods not rerun now are kept (methods can be run one at a time)
        old = json.loads(out_path.read_text())
        kept = [r for r in old.get("rows", []) if r.get("method") not in methods]
        kept_rm = old.get("reward_model")
    out = {
        "rows": sorted(kept + rows, key=lambda r: list(METHODS).index(r["method"])),
        "reward_model": rm or kept_rm,
        "feedback": feedback,
        "settings": settings,
        "machine": info,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
