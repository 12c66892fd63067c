"""Sample efficiency: evaluation reward against reward queries, every algorithm on the same budget.

    OMP_NUM_THREADS=1 python benchmarks/sample_efficiency.py                     # the toy recipes
    python benchmarks/sample_efficiency.py --budget 4096 --rounds 8 --seeds 0 1 2
    python benchmarks/sample_efficiency.py --recipes recipes/image/a.yaml recipes/image/b.yaml \
        --name image --device cuda --eval-seeds-per-prompt 8 --reference a

What is measured. Each recipe is built from its YAML exactly as `diffalign fit` builds it (model and
data sections, jsonargparse `class_path`), with the recipe's own base model, hyperparameters and batch
size; only the stopping rule changes. A `lightning.Trainer` runs it without an epoch limit until
`AlignmentModule.reward_queries` (samples sent to the reward during training) reaches `--budget`;
training stops after the batch that reaches it, so the last batch may overshoot by less than one
batch's queries. Every `--budget / --rounds` queries (after the batch that crosses each mark) the live
policy (EMA weights if the recipe keeps an EMA) is scored on the data module's fixed evaluation set
(`evaluation_set()`: each evaluation prompt × `--eval-seeds-per-prompt` seeds, one generator per
sample) with `diffalign.core.callbacks.evaluate_reward`, and (reward queries, mean reward) is recorded.
The evaluation is not counted as reward queries and is excluded from the training wall time.

Each (recipe, seed) runs in its own subprocess, so peak memory is per run: `ru_maxrss` of that process
on a CPU (mostly the imported libraries for the toy model; `rss_start_mib` is the RSS once the recipe is
built) or `torch.cuda.max_memory_allocated` on a GPU. Seeds: `--seeds` sets `seed_everything` and
`model.init_args.seed` (the rollout-noise generator) to the same values for every algorithm; seed 0
reproduces the recipes. With several seeds the curves are averaged round by round.

The table: final evaluation reward at the budget; the reward queries each algorithm needed to reach
the reference algorithm's (`--reference`, default DDPO) final reward, linearly interpolated between
evaluation rounds (so its resolution is one round); `speed-up` = reference queries / algorithm
queries (the anchors report reward backpropagation reaching DDPO's reward with ~25× fewer queries);
the same for a less saturated target, 90 % of the reference's gain over the starting reward; the best
evaluation reward and where it was reached (a collapse after a peak shows as best ≫ final); training
wall seconds (evaluation excluded; noisy on a shared machine) and peak memory. `--from-json` redoes
the table, JSON and plot from earlier result files without training; a file that is itself a merge
(it has `merged_from`) can be merged with further parts, and its parts' commands are kept.

Writes benchmarks/results/sample_efficiency_<name>.json and .png (reward vs reward queries, and beside it
the guards' diversity and gold reward when the runs measured them).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
#: what the reward-hacking guards add to every evaluation round (core.guards)
GUARD_KEYS = ("diversity", "vendi", "gold_mean", "kl_to_reference")
TOY = [
    "ddpo_mode",
    "dpok_mode",
    "grpo_mode",
    "grpo_flow_mode",
    "draft_mode",
    "draft_lv_mode",
    "alignprop_mode",
    "refl_mode",
    "rwr_mode",
    "raft_mode",
]
DEFAULT_RECIPES = [f"recipes/toy/{r}.yaml" for r in TOY]


def label(recipe: str) -> str:
    """Short name of a recipe: its file stem without a trailing `_mode`."""
    stem = Path(recipe).stem
    return stem[: -len("_mode")] if stem.endswith("_mode") else stem


# -- one run (in a subprocess) ----------------------------------------------------------------------
def build(recipe: str, overrides: list[str]) -> tuple[Any, Any, dict]:
    """The recipe's AlignmentModule, data module and trainer section, parsed as `diffalign fit` does."""
    import yaml
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning import LightningDataModule

    from diffalign.core.module import AlignmentModule
    from diffalign.core.recipes import expand_config_args

    parser = ArgumentParser(prog="sample_efficiency", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(AlignmentModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    parser.add_argument("--trainer", type=dict, default={})
    for ignored in ("seed_everything", "run_root", "ckpt_path"):  # set here, or used by `fit` only
        parser.add_argument(f"--{ignored}", type=object, default=None)
    argv, files = expand_config_args(["--config", recipe, *overrides])  # the recipe and its bases
    cfg = parser.parse_args(argv)
    trainer_cfg: dict = {}  # a dict-typed key is replaced by each file, not merged: merge the files' here
    for f in files:
        trainer_cfg.update((yaml.safe_load(Path(f).read_text()) or {}).get("trainer") or {})
    trainer_cfg.update(cfg.get("trainer") or {})
    backbone_cfg = cfg.model.init_args.policy.init_args.backbone
    trainer_cfg["_backbone"] = backbone_cfg.as_dict() if hasattr(backbone_cfg, "as_dict") else backbone_cfg
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    init = instantiate(cfg)
    return init.model, init.data, trainer_cfg


def family(module: Any, backbone_cfg: Any) -> dict[str, Any]:
    """The base model: its config, a fingerprint of its initial weights, prediction type and sampler."""
    backbone = module.policy.backbone
    digest = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "backbone": backbone_cfg,
        "weights_sha256": digest.hexdigest()[:16],
        "prediction_type": backbone.prediction_type,
        "kernel": type(module.policy.kernel).__name__,
        "num_steps": module.policy.num_steps,
    }


def make_guards(args: argparse.Namespace) -> Any:
    """The evaluation's reward-hacking guards (`core.guards`), or None with --no-guards."""
    if args.no_guards:
        return None
    from diffalign.core.guards import RewardGuards
    from diffalign.core.reward import import_object

    gold = import_object(args.gold)() if args.gold else None
    return RewardGuards(gold_reward=gold, features=args.features, kl_to_reference=not args.no_kl)


def make_callback(budget: int, rounds: int, pairs: list, eval_batch_size: int, device_type: str, guards: Any):
    from lightning.pytorch.callbacks import Callback

    from diffalign.core.callbacks import evaluate_reward

    def sync() -> None:
        if device_type == "cuda":
            torch.cuda.synchronize()

    class BudgetedEvaluation(Callback):
        """Evaluates every budget/rounds reward queries and stops training once the budget is spent."""

        def __init__(self) -> None:
            self.interval = max(1, budget // max(1, rounds))
            self.next_mark = self.interval
            self.curve: list[dict[str, float]] = []
            self.eval_seconds = 0.0
            self.t0 = 0.0
            self.queries_per_batch: list[int] = []
            self._last_q = 0

        def evaluate(self, trainer: Any, module: Any) -> None:
            sync()
            t = time.perf_counter()
            with module.ema_weights():
                if guards is None:
                    out = evaluate_reward(module, pairs, eval_batch_size)
                else:
                    out = guards.evaluate(module, pairs, eval_batch_size)
            sync()
            self.eval_seconds += time.perf_counter() - t
            point = {
                "reward_queries": int(module.reward_queries),
                "reward": out["mean"],
                "reward_std": out["std"],
                "updates": int(trainer.global_step),
                "failed": out["failed"],
            }
            extra = ""
            if guards is not None:
                warnings = guards.record(trainer.global_step, out)
                g = out["guards"]
                point.update({k: g[k] for k in GUARD_KEYS if k in g})
                point["guard_warnings"] = warnings
                extra = "  " + "  ".join(f"{k} {g[k]:.4g}" for k in GUARD_KEYS if k in g)
                extra += f"  WARNING: {warnings[0]}" if warnings else ""
            self.curve.append(point)
            print(
                f"  queries {module.reward_queries:>7d}  eval reward {out['mean']:.4f}{extra}",
                file=sys.stderr,
                flush=True,
            )

        def on_fit_start(self, trainer: Any, module: Any) -> None:
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if guards is not None:
                guards.setup(module)  # the reference for the KL: the initial weights
            self.evaluate(trainer, module)
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            q = int(module.reward_queries)
            self.queries_per_batch.append(q - self._last_q)
            self._last_q = q
            done = q >= budget
            if q >= self.next_mark or done:
                self.evaluate(trainer, module)
                while self.next_mark <= q:
                    self.next_mark += self.interval
            if done:
                trainer.should_stop = True

        def on_train_end(self, trainer: Any, module: Any) -> None:
            sync()
            self.wall = time.perf_counter() - self.t0 - self.eval_seconds

    return BudgetedEvaluation()


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train one recipe with one seed until the budget is spent; returns its record."""
    import logging

    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(args.seed, workers=True, verbose=False)
    overrides = [f"--model.init_args.seed={args.seed}", *args.override]
    if args.eval_seeds_per_prompt is not None:
        overrides.append(f"--data.init_args.eval_seeds_per_prompt={args.eval_seeds_per_prompt}")
    module, data, trainer_cfg = build(args.worker, overrides)
    base = family(module, trainer_cfg.pop("_backbone"))
    if not hasattr(data, "evaluation_set"):
        raise SystemExit(f"{args.worker}: the data module has no evaluation_set(); cannot evaluate")
    pairs = data.evaluation_set()
    accelerator = args.device or trainer_cfg.get("accelerator", "cpu")
    device_type = "cuda" if accelerator in ("cuda", "gpu") else "cpu"
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cb = make_callback(args.budget, args.rounds, pairs, args.eval_batch_size, device_type, make_guards(args))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=args.precision or trainer_cfg.get("precision") or "32-true",
        max_epochs=-1,
        max_steps=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[cb],
    )
    trainer.fit(module, datamodule=data)
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        mem_kind = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem_kind = "ru_maxrss (process)"
    qpb = sorted(set(cb.queries_per_batch))
    return {
        "recipe": args.worker,
        "algorithm": type(module.algorithm).__name__,
        "seed": args.seed,
        "family": base,
        "queries_per_batch": qpb[0] if len(qpb) == 1 else qpb,
        "reward_queries": int(module.reward_queries),
        "updates": int(trainer.global_step),
        "curve": cb.curve,
        "train_wall_s": round(cb.wall, 3),
        "eval_wall_s": round(cb.eval_seconds, 3),
        "peak_mem_mib": round(peak, 1),
        "peak_mem_kind": mem_kind,
        "rss_start_mib": round(rss_start, 1),
        "eval_samples": len(pairs),
        "device": accelerator,
    }


# -- aggregation ------------------------------------------------------------------------------------
def mean_curve(runs: list[dict]) -> list[dict[str, float]]:
    """Round-by-round mean over seeds (rounds fall at the same query marks when batches are equal)."""
    n = min(len(r["curve"]) for r in runs)
    out = []
    for i in range(n):
        pts = [r["curve"][i] for r in runs]
        rewards = [p["reward"] for p in pts]
        m = sum(rewards) / len(rewards)
        point = {
            "reward_queries": sum(p["reward_queries"] for p in pts) / len(pts),
            "reward": m,
            "reward_seed_std": math.sqrt(sum((x - m) ** 2 for x in rewards) / len(rewards)),
        }
        for key in GUARD_KEYS:
            values = [p[key] for p in pts if isinstance(p.get(key), (int, float)) and math.isfinite(p[key])]
            if values:
                point[key] = sum(values) / len(values)
        point["guard_warned"] = any(p.get("guard_warnings") for p in pts)
        out.append(point)
    return out


def queries_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """First reward-query count at which the curve reaches `target`, interpolated between rounds."""
    prev = None
    for p in curve:
        if p["reward"] >= target:
            if prev is None or p["reward"] == prev["reward"]:
                return float(p["reward_queries"])
            frac = (target - prev["reward"]) / (p["reward"] - prev["reward"])
            return prev["reward_queries"] + frac * (p["reward_queries"] - prev["reward_queries"])
        prev = p
    return None


def summarise(records: dict[str, list[dict]], reference: str) -> list[dict[str, Any]]:
    rows = []
    curves = {name: mean_curve(runs) for name, runs in records.items()}
    ref_final = curves[reference][-1]["reward"] if reference in curves else None
    ref_q = queries_to_reach(curves[reference], ref_final) if ref_final is not None else None
    # a less saturated target: 90 % of the reference's gain over the starting reward
    gain90 = curves[reference][0]["reward"] + 0.9 * (ref_final - curves[reference][0]["reward"])
    ref_q90 = queries_to_reach(curves[reference], gain90)
    for name, runs in records.items():
        curve = curves[name]
        q = queries_to_reach(curve, ref_final) if ref_final is not None else None
        q90 = queries_to_reach(curve, gain90)
        rows.append(
            {
                "name": name,
                "algorithm": runs[0]["algorithm"],
                "recipe": runs[0]["recipe"],
                "family": runs[0]["family"],
                "queries_per_batch": runs[0]["queries_per_batch"],
                "reward_before": curve[0]["reward"],
                "final_reward": curve[-1]["reward"],
                "final_reward_seed_std": curve[-1]["reward_seed_std"],
                "final_reward_eval_std": sum(r["curve"][-1]["reward_std"] for r in runs) / len(runs),
                "best_reward": max(p["reward"] for p in curve),
                "best_reward_queries": max(curve, key=lambda p: p["reward"])["reward_queries"],
                "num_seeds": len(runs),
                "reward_queries": sum(r["reward_queries"] for r in runs) / len(runs),
                "updates": sum(r["updates"] for r in runs) / len(runs),
                "queries_to_reference": q,
                "speedup_vs_reference": (ref_q / q) if (q and ref_q) else None,
                "target_90pct_gain": gain90,
                "queries_to_90pct_gain": q90,
                "speedup_90pct_gain": (ref_q90 / q90) if (q90 and ref_q90) else None,
                "start": {k: curve[0][k] for k in GUARD_KEYS if k in curve[0]},
                "final": {k: curve[-1][k] for k in GUARD_KEYS if k in curve[-1]},
                "first_guard_warning_queries": next(
                    (p["reward_queries"] for p in curve if p.get("guard_warned")), None
                ),
                "train_wall_s": sum(r["train_wall_s"] for r in runs) / len(runs),
                "peak_mem_mib": max(r["peak_mem_mib"] for r in runs),
                "curve": curve,
            }
        )
    return rows


def fmt_q(q: float | None) -> str:
    return f"{q:,.0f}" if q is not None else "not reached"


def guard_cell(row: dict, key: str) -> str:
    """A guard's final value, with its value before training in parentheses (not for the KL, 0 there)."""
    final, start = row["final"], row["start"]
    if key not in final:
        return "–"
    before = f" ({start[key]:.3g})" if key in start and key != "kl_to_reference" else ""
    return f"{final[key]:.3g}{before}"


def table(rows: list[dict], reference: str, ref_final: float | None) -> str:
    target = f"{ref_final:.3f}" if ref_final is not None else "n/a"
    target90 = f"{rows[0]['target_90pct_gain']:.3f}"
    guards = any(r["final"] for r in rows)
    head = (
        f"| algorithm | final reward | best reward (at queries) | queries to reach {reference}'s {target} "
        f"| speed-up vs {reference} | queries to 90 % of {reference}'s gain ({target90}) "
        f"| speed-up | updates | train wall s | peak MiB |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if guards:
        head += " diversity | Vendi | gold | KL (nats) | guard warning at |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        q = r["queries_to_reference"]
        s = r["speedup_vs_reference"]
        std = f" ± {r['final_reward_seed_std']:.3f}" if r["num_seeds"] > 1 else ""
        best = f"{r['best_reward']:.3f} ({r['best_reward_queries']:,.0f})"
        reached = fmt_q(q)
        s90 = r["speedup_90pct_gain"]
        lines.append(
            f"| {r['name']} | {r['final_reward']:.3f}{std} | {best} | {reached} "
            f"| {f'{s:.2f}×' if s is not None else '–'} | {fmt_q(r['queries_to_90pct_gain'])} "
            f"| {f'{s90:.2f}×' if s90 is not None else '–'} "
            f"| {r['updates']:.0f} | {r['train_wall_s']:.1f} "
            f"| {r['peak_mem_mib']:.0f} |"
        )
        if guards:
            cells = [guard_cell(r, k) for k in GUARD_KEYS]
            warned = r["first_guard_warning_queries"]
            lines[-1] += " " + " | ".join(cells) + f" | {fmt_q(warned) if warned is not None else 'none'} |"
    return "\n".join(lines)


#: the plot's panels: the reward, then the guards' diversity and gold reward where the runs have them
PANELS = (
    ("reward", "evaluation reward (fixed seeds)"),
    ("diversity", "diversity within a prompt"),
    ("gold_mean", "gold reward"),
)


def plot(rows: list[dict], path: Path, reference: str, ref_final: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _ in PANELS if k == "reward" or any(k in p for r in rows for p in r["curve"])]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(1.5 + 4.2 * len(keys), 4.5), dpi=120, squeeze=False, layout="constrained"
    )
    styles = ["-", "--", "-.", ":"]
    for ax, (key, ylabel) in zip(axes[0], [p for p in PANELS if p[0] in keys], strict=True):
        for i, r in enumerate(rows):
            points = [p for p in r["curve"] if isinstance(p.get(key), (int, float))]
            ref = r["name"] == reference
            ax.plot(
                [p["reward_queries"] for p in points],
                [p[key] for p in points],
                styles[(i // 10) % 4],
                marker=".",
                ms=3,
                lw=2.2 if ref else 1.3,
                color="black" if ref else f"C{i % 10}",
                zorder=3 if ref else 2,
                label=r["name"],
            )
        if key == "reward" and ref_final is not None:
            ax.axhline(ref_final, color="gray", ls=":", lw=1, label=f"{reference} final")
        ax.set_xlabel("reward queries (training samples scored)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="outside right center")
    fig.savefig(path)
    plt.close(fig)


# -- driver -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipe YAML files")
    p.add_argument("--budget", type=int, default=10240, help="reward queries per algorithm")
    p.add_argument("--rounds", type=int, default=16, help="evaluations spread over the budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="same seeds for every algorithm")
    p.add_argument("--eval-seeds-per-prompt", type=int, default=None, help="default: the recipe's")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--reference", default="ddpo", help="label of the recipe others are compared with")
    p.add_argument("--device", default=None, help="Trainer accelerator (default: the recipe's)")
    p.add_argument("--precision", default=None, help="Trainer precision (default: the recipe's or 32)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra recipe argument, e.g. --override=--model.init_args.lr_scheduler=null",
    )
    p.add_argument("--gold", default=None, help="dotted path of a gold Reward class (no arguments)")
    p.add_argument("--features", default=None, help="dotted path of the diversity feature function")
    p.add_argument("--no-guards", action="store_true", help="skip diversity / gold / KL")
    p.add_argument("--no-kl", action="store_true", help="skip the KL to the reference")
    p.add_argument("--name", default="toy", help="results go to sample_efficiency_<name>.{json,png}")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="re-summarise the runs of earlier JSON files (several: their runs merged; same budget/rounds)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one recipe
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker:
        rec = run_one(args)
        args.worker_out.write_text(json.dumps(rec))
        return rec
    names = [label(r) for r in args.recipes]
    if len(set(names)) != len(names):
        raise SystemExit(f"recipe labels must be unique, got {names}")
    records: dict[str, list[dict]] = {}
    if args.from_json is not None:  # re-summarise stored runs (table, JSON, plot) without training
        files = [json.loads(f.read_text()) for f in args.from_json]
        old = files[0]
        for other in files[1:]:
            if (other["budget"], other["rounds"], other["seeds"]) != (
                old["budget"],
                old["rounds"],
                old["seeds"],
            ):
                raise SystemExit("--from-json files must share budget, rounds and seeds")
        for path, f in zip(args.from_json, files, strict=True):
            for name, runs in f["runs"].items():
                if name in records:
                    raise SystemExit(f"--from-json: {path} has runs of {name!r}, already in an earlier file")
                records[name] = runs
        names = list(records)
        args.budget, args.rounds, args.seeds = old["budget"], old["rounds"], old["seeds"]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, name in zip([] if args.from_json else args.recipes, names, strict=False):
            for seed in args.seeds:
                out = Path(tmp) / f"{name}_{seed}.json"
                cmd = [sys.executable, __file__, "--worker", recipe, "--seed", str(seed)]
                cmd += ["--worker-out", str(out), "--budget", str(args.budget), "--rounds", str(args.rounds)]
                cmd += ["--eval-batch-size", str(args.eval_batch_size)]
                if args.eval_seeds_per_prompt is not None:
                    cmd += ["--eval-seeds-per-prompt", str(args.eval_seeds_per_prompt)]
                for flag in ("device", "precision", "gold", "features"):
                    if getattr(args, flag):
                        cmd += [f"--{flag}", getattr(args, flag)]
                cmd += ["--no-guards"] if args.no_guards else []
                cmd += ["--no-kl"] if args.no_kl else []
                cmd += [f"--override={o}" for o in args.override]
                print(f"{name} (seed {seed}): {recipe}", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
                records.setdefault(name, []).append(json.loads(out.read_text()))
    reference = args.reference if args.reference in records else None
    rows = summarise(records, reference) if reference else summarise(records, names[0])
    reference = reference or names[0]
    ref_final = next(r["final_reward"] for r in rows if r["name"] == reference)
    md = table(rows, reference, ref_final)
    first = records[names[0]][0]
    note = (
        f"Evaluation reward (mean over {first['eval_samples']} fixed (prompt, seed) samples) after "
        f"{args.budget} reward queries per algorithm, seed(s) {args.seeds}; queries to reach {reference}'s "
        f"final reward are interpolated between {args.rounds} evaluation rounds. The anchors "
        "report reward backprop reaching DDPO's reward with ~25x fewer reward queries on Stable Diffusion "
        "aesthetics, and DiffusionNFT up to 25x fewer steps than Flow-GRPO at equal GenEval on SD 3.5 (a "
        "grpo_flow row is the Flow-GRPO baseline for that ratio; with equal batches, queries are steps); "
        "this run measures these ratios on these recipes, each with its own recipe "
        "hyperparameters (not tuned for this budget; a recipe shorter than the budget is run past its "
        "own length, and 'best reward' shows a collapse after the peak). Wall time excludes evaluation "
        "and is noisy on a "
        f"shared machine; peak memory is {first['peak_mem_kind']}."
    )
    result = {
        "name": args.name,
        "command": "python benchmarks/sample_efficiency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_measured": None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": note,
        "budget": args.budget,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "reference": reference,
        "reference_final_reward": ref_final,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "device": first["device"],
        },
        "table_markdown": md,
        "algorithms": rows,
        "runs": records,
    }
    if args.from_json is not None:  # keep what was measured, note the re-summary
        result["resummarised_by"], result["command"] = result["command"], old["command"]
        result["date_measured"] = old.get("date_measured") or old["date"]
        if len(files) > 1:  # an already merged file contributes the parts it was merged from
            result["merged_from"] = [
                part
                for f in files
                for part in f.get("merged_from") or [{"command": f["command"], "date": f["date"]}]
            ]
        result["machine"] = old["machine"]
    else:
        result["date_measured"] = result["date"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"sample_efficiency_{args.name}.json"
    png_path = args.out_dir / f"sample_efficiency_{args.name}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(
        rows, png_path, reference, ref_final, f"sample efficiency ({args.name}, budget {args.budget} queries)"
    )
    print(md)
    print(f"\n{note}\nwrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
