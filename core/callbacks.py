"""Callbacks every run gets: a fixed-seed evaluation with `summary.json`, reward curves, weight export,
checkpoints and a CSV log that survive being killed and resumed."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_warn

from diffalign.core.io import atomic_write, save_state_dict, write_json

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the first logger's log dir, else the trainer's root dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def print_result(trainer: L.Trainer, text: str) -> None:
    """Print a result line for the user after finishing the progress bar, so the bar does not come last."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and trainer.lightning_module is not None:
        bar.teardown(trainer, trainer.lightning_module, "fit")  # stops a rich bar; idempotent
    print(text, flush=True)


@torch.no_grad()
def evaluate_reward(
    module: Any, pairs: list[tuple[Any, int]], batch_size: int = 64, on_batch: Callable | None = None
) -> dict[str, Any]:
    """Mean reward of the policy over fixed (prompt, seed) pairs, through the one sampling path
    (`core.sampling`: each sample from its own seed, so results do not depend on `batch_size`).

    Returns mean, std, count of finite scores, number of failed scores, and per-prompt means.
    `on_batch(sampled_batch)` sees every scored batch (the reward-hacking guards measure there); when it
    has a `finish(real, ranks)` method, that is called once after the last batch, on every rank, with
    the number of rows this rank scored that belong to the set (the rest pad its shard), to gather what
    it collected (`core.guards.GuardMeter.finish`).

    With several processes (a collective: every rank calls it) each rank samples one contiguous shard of
    the pairs and the scores are gathered in the set's order, so every rank returns the statistics of
    the whole set, each pair counted once.
    """
    from diffalign.core.distributed import Ranks
    from diffalign.core.sampling import sample_pairs

    policy, reward = module.policy, module.reward
    ranks = Ranks.current()
    # equal shards (the last padded with repeats of the set's last pair, whose scores are left out), so
    # every rank makes the same denoiser calls: sharded weights (FSDP) are gathered in lockstep
    size = -(-len(pairs) // ranks.world_size)
    start = min(len(pairs), ranks.rank * size)
    mine = list(pairs[start : start + size])
    real = len(mine)
    mine += [pairs[-1]] * (size - real) if pairs else []
    was_training = policy.training
    policy.eval()
    rows: list[tuple[Any, float]] = []
    try:
        for batch in sample_pairs(policy, mine, batch_size, reward=reward):
            if on_batch is not None:  # sees this rank's batches (padding rows included)
                on_batch(batch)
            rows += zip(batch.cond.prompts or [None] * len(batch), batch.scores.tolist(), strict=True)
    finally:
        policy.train(was_training)
    finish = getattr(on_batch, "finish", None)
    if finish is not None:
        finish(real, ranks)
    rows = rows[:real]
    scores: list[float] = []
    per_prompt: dict[str, list[float]] = {}
    failed = 0
    for p, s in ranks.gather_lists(rows):
        if math.isfinite(s):
            scores.append(s)
            per_prompt.setdefault(str(p), []).append(s)
        else:
            failed += 1
    t = torch.tensor(scores) if scores else torch.tensor([float("nan")])
    return {
        "mean": float(t.mean()),
        "std": float(t.std(unbiased=False)),
        "count": len(scores),
        "failed": failed,
        "per_prompt": {k: sum(v) / len(v) for k, v in per_prompt.items()},
    }


class RewardEvaluation(Callback):
    """Scores a fixed set of (condition, seed) pairs before training and at the end.

    Writes `summary.json` into the run folder (reward_before, reward_after, reward_queries,
    wall_seconds, recipe, ...) and `reward_curve.png` (training reward per step), and logs both to
    TensorBoard when a TensorBoard logger is attached. Its state lives in checkpoints, so a resumed run
    keeps the first run's `reward_before` and adds up wall time.

    The evaluation set comes from the data module's `evaluation_set()` when it has one, else from
    `prompts` × `seeds_per_prompt`. With several processes every rank evaluates its shard of the set
    (`evaluate_reward`) and rank 0 writes the files.

    Reward-hacking guards (`core.guards`, on by default): each evaluation also measures diversity within
    a prompt (mean pairwise distance and Vendi score in the `features` space), the `gold_reward` when
    given, and the KL to the reference; `summary.json` gets them under "guards" (before, after, history,
    warnings), `reward_curve.png` plots them beside the reward, and a warning is raised when the reward
    rose while diversity or gold fell beyond the thresholds (`GuardRule`). With `guard_every_n_steps`
    the evaluation also runs during training (and `early_stop` stops the run at the first warning).

    Args:
        prompts: evaluation conditions when the data module has no evaluation set.
        seeds_per_prompt: samples per condition in that case.
        seed: first seed in that case.
        batch_size: samples per evaluation rollout.
        recipe: recipe name written to the summary (the CLI fills in the config file's name).
        plot: write reward_curve.png.
        guards: measure the reward-hacking guards.
        gold_reward: a held-out reward scored beside the training reward.
        features: dotted path of a function fn(samples, cond) → (B, D) features for diversity (default:
            the backbone's `features`, the flattened samples unless the modality says otherwise).
        kl_to_reference: estimate the KL to the reference (keeps a frozen copy for runs that have none).
        guard_every_n_steps: also evaluate every n optimiser steps during training.
        diversity_drop, gold_drop, max_kl: the thresholds of `core.guards.GuardRule`.
        early_stop: stop training at the first guard warning of a periodic evaluation.
    """

    def __init__(
        self,
        prompts: list[Any] | None = None,
        seeds_per_prompt: int = 8,
        seed: int = 10_000,
        batch_size: int = 64,
        recipe: str | None = None,
        plot: bool = True,
        guards: bool = True,
        gold_reward: Any = None,
        features: str | None = None,
        kl_to_reference: bool = True,
        guard_every_n_steps: int | None = None,
        diversity_drop: float = 0.5,
        gold_drop: float = 0.05,
        max_kl: float | None = None,
        early_stop: bool = False,
    ) -> None:
        from diffalign.core.guards import GuardRule, RewardGuards

        self.prompts = prompts
        self.seeds_per_prompt = seeds_per_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.recipe = recipe
        self.plot = plot
        rule = GuardRule(diversity_drop, gold_drop, max_kl)
        self.guards = RewardGuards(gold_reward, features, kl_to_reference, rule) if guards else None
        self.guard_every_n_steps, self.early_stop = guard_every_n_steps, early_stop
        self.before: dict[str, Any] | None = None
        self.history: list[tuple[int, float]] = []
        self.wall_offset = 0.0
        self._t0 = time.perf_counter()

    def _pairs(self, trainer: L.Trainer) -> list[tuple[Any, int]]:
        from diffalign.core.sampling import seed_pairs

        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "evaluation_set"):
            return dm.evaluation_set()
        if not self.prompts:
            raise ValueError("RewardEvaluation needs `prompts` when the data module has no evaluation_set()")
        return seed_pairs(self.prompts, self.seeds_per_prompt, self.seed)

    def _elapsed(self) -> float:
        return self.wall_offset + time.perf_counter() - self._t0

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.guards is not None and stage == "fit" and getattr(pl_module, "reward", None) is not None:
            self.guards.setup(pl_module)  # before a checkpoint is restored: the reference is the start

    def _evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        if self.guards is None:
            return evaluate_reward(pl_module, self._pairs(trainer), self.batch_size)
        result = self.guards.evaluate(pl_module, self._pairs(trainer), self.batch_size)
        for message in self.guards.record(trainer.global_step, result):
            msg = f"step {trainer.global_step}: possible reward hacking: {message}"
            log.warning(msg)
            rank_zero_warn(msg)
        return result

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0 = time.perf_counter()
        if getattr(pl_module, "reward", None) is None or self.before is not None:
            return
        self.before = self._evaluate(trainer, pl_module)
        log.info("reward before training: %.4f over %d samples", self.before["mean"], self.before["count"])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = trainer.callback_metrics.get("train/reward_mean")
        if value is not None:
            self.history.append((int(trainer.global_step), float(value)))
        n, step = self.guard_every_n_steps, int(trainer.global_step)
        last = self.guards.history[-1]["step"] if self.guards is not None and self.guards.history else None
        if (
            n and last is not None and step // n > last // n
        ):  # every n optimiser steps, whatever a batch takes
            warned = len(self.guards.warnings)
            ema = getattr(pl_module, "ema_weights", None)
            with ema() if ema is not None else contextlib.nullcontext():
                self._evaluate(trainer, pl_module)
            if self.early_stop:
                # the guards' values are the whole set's on every rank, so the ranks agree; the flags
                # make sure of it (every rank takes this branch: the schedule depends on steps only)
                from diffalign.core.distributed import Ranks

                if any(Ranks.current().flags(len(self.guards.warnings) > warned)):
                    trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        # every rank takes part in the evaluation and in `trainer.log_dir` (collectives); rank 0 writes
        folder = run_dir(trainer)
        after = None
        if getattr(pl_module, "reward", None) is not None:
            ema = getattr(pl_module, "ema_weights", None)
            with ema() if ema is not None else contextlib.nullcontext():
                after = self._evaluate(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        summary: dict[str, Any] = {
            "recipe": self.recipe,
            "global_step": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "wall_seconds": round(self._elapsed(), 3),
            "reward_queries": int(getattr(pl_module, "reward_queries", 0)),
            "run_dir": str(folder),
        }
        guarded = getattr(pl_module, "guarded_reward", None)
        if guarded is not None:  # samples the on_invalid_reward: drop policy skipped during training
            summary["reward_dropped"] = int(getattr(pl_module, "reward_dropped", guarded.dropped))
        skipped = getattr(trainer.datamodule, "skipped_rows", None)
        if skipped is not None:  # malformed data rows the on_error: skip policy left out
            summary["data_skipped_rows"] = int(skipped)
        if after is not None:
            before = self.before or {}
            summary.update(
                {
                    "reward_name": pl_module.reward.name,
                    "reward_before": before.get("mean"),
                    "reward_before_std": before.get("std"),
                    "reward_after": after["mean"],
                    "reward_after_std": after["std"],
                    "eval_samples": after["count"],
                    "eval_failed": after["failed"],
                    "reward_before_per_prompt": before.get("per_prompt"),
                    "reward_after_per_prompt": after["per_prompt"],
                }
            )
            if self.guards is not None:
                summary["guards"] = {
                    "before": before.get("guards"),
                    "after": after.get("guards"),
                    "history": self.guards.history,
                    "warnings": self.guards.warnings,
                    "thresholds": vars(self.guards.rule),
                }
        write_json(folder / "summary.json", summary)
        if self.plot and self.history:
            self._plot(trainer, folder / "reward_curve.png", summary)
        if "reward_after" in summary:
            guards = ""
            if "guards" in summary:
                from diffalign.core.guards import describe

                guards = describe(summary["guards"]) + "\n"
            print_result(
                trainer,
                f"\nreward ({summary['reward_name']}) before {summary['reward_before']:.4f} -> "
                f"after {summary['reward_after']:.4f} over {summary['eval_samples']} fixed samples; "
                f"{summary['reward_queries']} reward queries, {summary['wall_seconds']:.1f} s\n"
                f"{guards}run folder: {folder}  (summary.json, metrics.csv, config.yaml"
                f"{', reward_curve.png' if self.plot and self.history else ''})",
            )

    def _plot(self, trainer: L.Trainer, path: Path, summary: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, values = zip(*self.history, strict=True)
        extra = self.guards.panels() if self.guards is not None else 0
        fig, axes = plt.subplots(1, 1 + extra, figsize=(6 + 3.2 * extra, 3.5), dpi=120, squeeze=False)
        ax = axes[0][0]
        if extra:
            self.guards.plot(list(axes[0][1:]))
        ax.plot(steps, values, lw=1.2, label="training batch reward")
        for key, style in (("reward_before", "--"), ("reward_after", ":")):
            if summary.get(key) is not None:
                ax.axhline(summary[key], ls=style, color="gray", label=f"{key} (eval)")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(summary.get("reward_name") or "reward")
        ax.set_title(summary.get("recipe") or "reward curve")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("reward_curve", fig, global_step=trainer.global_step)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        state = {"before": self.before, "history": list(self.history), "wall_offset": self._elapsed()}
        if self.guards is not None:
            state["guards"] = self.guards.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("before")
        self.history = [tuple(h) for h in state.get("history", [])]
        self.wall_offset = float(state.get("wall_offset", 0.0))
        if self.guards is not None:
            self.guards.load_state_dict(state.get("guards", {}))


class ExportBackbone(Callback):
    """At the end of training, write the backbone's weights as safetensors (how base models ship).

    Args:
        path: output file, e.g. "modalities/toy/toy_base.safetensors".
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from diffalign.core.distributed import is_sharded

        sharded = is_sharded(trainer)  # the state dict gathers the shards: every rank asks
        if not trainer.is_global_zero and not sharded:
            return
        # no metadata: safetensors orders a metadata map arbitrarily, which would make the bytes differ
        ema = getattr(pl_module, "ema_weights", None)
        with ema() if ema is not None else contextlib.nullcontext():
            if not trainer.is_global_zero:
                pl_module.policy.backbone.state_dict()
                return
            out = save_state_dict(pl_module.policy.backbone, self.path)
        print_result(trainer, f"exported backbone weights to {out}")


def _complete_rows_before(path: Path, step: int | None) -> list[dict[str, str]]:
    """Rows of a metrics.csv logged before `step` (none when `step` is None); a row cut short by a kill
    (missing or extra fields, unparsable step) is left out."""
    if step is None:
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for r in rows:
        if None in r or any(v is None for v in r.values()):
            continue
        try:
            if int(float(r.get("step") or "nan")) < step:
                kept.append(r)
        except ValueError:
            continue
    return kept


def _write_rows(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv keeps its rows logged before
    `keep_before_step` instead of being deleted, and every rewrite of the file is atomic."""

    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        rows = _complete_rows_before(path, self.keep_before_step)
        if not rows:
            path.unlink()
            return
        self.metrics_keys = sorted(set().union(*rows))
        _write_rows(path, self.metrics_keys, rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_rows(path, fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that keeps the rows of the interrupted run when a run resumes in its own folder.

    Lightning's CSV writer deletes an existing metrics.csv. This logger keeps the rows logged before the
    checkpoint it resumes from (`keep_before_step`); rows logged after that checkpoint are dropped, since
    the resumed run logs those steps again. The file is rewritten atomically, so a kill at any moment
    leaves either the old or the new rows.
    """

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before_step = keep_before_step

    @property
    @rank_zero_experiment  # other ranks get a dummy: only rank 0 touches metrics.csv
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.keep_before_step)
        return self._experiment


_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for run folders that are resumed in place.

    Lightning restores its bookkeeping (which file is `last.ckpt`, which epoch file to prune next) only
    when the checkpoint folder is spelled exactly as at save time; through another spelling (relative
    then absolute, a moved or symlinked run folder) it writes `last-v1.ckpt` and stops pruning. This
    callback maps the stored paths onto the current folder instead. Names never get a `-vN` suffix: a
    resumed run overwrites what the killed run wrote after its checkpoint, which holds the same states.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)

    @property
    def state_key(self) -> str:
        # a plain ModelCheckpoint's key, so runs checkpointed before this class existed resume fully
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        with warnings.catch_warnings():  # a resumed run's folder is not empty, by design
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
            super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and os.path.normpath(str(old)) != os.path.normpath(str(new)):
            state_dict = dict(state_dict)

            def moved(path: Any) -> Any:
                if path and os.path.dirname(os.path.normpath(str(path))) == os.path.normpath(str(old)):
                    return os.path.join(str(new), os.path.basename(str(path)))
                return path

            for key in _PATH_KEYS:
                if key in state_dict:
                    state_dict[key] = moved(state_dict[key])
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {moved(k): v for k, v in state_dict["best_k_models"].items()}
            state_dict["dirpath"] = new
        super().load_state_dict(state_dict)


class RatioConsistencyCheck(Callback):
    """Warns when the importance ratio is not 1 at the first update of an epoch.

    Before any update, re-scoring a stored trajectory under the same weights must reproduce its
    log-probs exactly (ratio exp(log p_new − log p_old) == 1). A deviation means the sampler and the
    trainer disagree: different guidance, step count, noise schedule, precision (bf16), dropout left on,
    a non-deterministic kernel, or EMA weights swapped in — the most common silent bug of
    policy-gradient fine-tuning. Reads `train/first_update_ratio_dev` (the largest |ratio − 1| over the
    micro-batches of the first optimiser step of a batch), logged by `AlignmentModule` for
    ratio-based algorithms.

    Args:
        tolerance: the largest |ratio − 1| accepted (float32 re-scoring is exact to ~1e-6).
        raise_error: raise instead of warning.
    """

    def __init__(self, tolerance: float = 1e-4, raise_error: bool = False) -> None:
        self.tolerance, self.raise_error = tolerance, raise_error
        self.worst: float = 0.0
        self.checked = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != 0:
            return
        value = trainer.callback_metrics.get("train/first_update_ratio_dev")
        if value is None:
            return
        dev = float(value)
        self.checked += 1
        self.worst = max(self.worst, dev)
        if dev > self.tolerance:
            msg = (
                f"epoch {trainer.current_epoch}: the importance ratio before the first update deviates from "
                f"1 by up to {dev:.3g} (tolerance {self.tolerance:g}); sampling and re-scoring disagree "
                "(guidance scale, step count, precision, dropout, EMA or scheduler mismatch)"
            )
            if self.raise_error:
                raise RuntimeError(msg)
            log.warning(msg)
            rank_zero_warn(msg)
