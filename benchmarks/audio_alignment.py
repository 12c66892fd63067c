"""Audio alignment on CPU: reward before/after per recipe over fixed (prompt, seed) pairs, every term of the
multi-reward run, a did-it-collapse number, test-time methods at equal NFE, and mel vs waveform samples/s.

    python benchmarks/audio_alignment.py --tasks ddpo_pitch               # one task at a time
    python benchmarks/audio_alignment.py --tasks dpo_pitch draft_loudness ddpo_multi
    python benchmarks/audio_alignment.py --tasks test_time throughput

Fit tasks run their recipe through the CLI (`diffalign fit`, in-process) into a temporary folder and read
`summary.json` (reward before/after over the recipe's evaluation set, its standard deviations, queries,
wall time); `dpo_pitch` first makes its AI-feedback pairs with `diffalign feedback`
(recipes/audio/feedback_pitch.yaml). On the same evaluation pairs the base and the aligned model are then
sampled again to report, per model: every reward term of `ddpo_multi` (pitch accuracy, timbre fidelity,
LUFS error), the note accuracy (share of notes within 50 cents) and the LUFS level, and the diversity of
each prompt's samples (mean pairwise L1 distance of their log-mel spectrograms in dB; a gain bought by
collapsing onto one sample shows as a drop). `test_time` samples the sampling recipes' pairs with plain
sampling (10 NFE), best-of-4 and FK steering with 4 particles (both 40 NFE). `throughput` times
sampling + decoding of 32 single notes (10 steps) with each backbone. `base_models` measures how far the
shipped models follow their prompts (as the recipes sample them): note accuracy (share of notes within 50
cents) and timbre accuracy (the timbre classifier's argmax) over the 32 single-note prompts × 2 seeds, and
the LUFS of "quiet" vs "loud" prompts (C4/G4 × sine/square × 3 seeds; targets −34 and −18).

Before and after sample the same (prompt, seed) pairs from the same noise, so each fit row's gains (the
run's reward and every side metric, `paired_gain`) carry the standard error of the per-pair differences;
the unpaired one (`gain_standard_error`, two independent means) is kept beside it. Prints markdown tables
and writes benchmarks/results/audio_alignment.json, keyed by task for a recipe as shipped and `task@label`
for an exploratory run (`-- <fit arguments>`, `--max-epochs`, the seed overrides; `--label`, default the
overrides; `--record` writes it under the task), so an exploratory run never replaces a recorded row;
rows of keys not run this time are kept (rows recorded before this rule keep their keys, "task
<overrides>"). `--merge A.json B.json` runs nothing and merges result files (written with `--out`) into
the results file.
"""

from __future__ import annotations

import argparse
import copy
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
sys.path.insert(0, str(REPO / "benchmarks"))
from common import paired_gains, row_key, save_rows  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
FIT_TASKS = {
    "ddpo_pitch": "recipes/audio/ddpo_pitch.yaml",
    "dpo_pitch": "recipes/audio/dpo_pitch.yaml",
    "draft_loudness": "recipes/audio/draft_loudness.yaml",
    "draft_flatness": "recipes/audio/draft_flatness.yaml",
    "ddpo_multi": "recipes/audio/ddpo_multi.yaml",
    "grpo_pitch": "recipes/audio/grpo_pitch.yaml",
    "grpo_multi": "recipes/audio/grpo_multi.yaml",
}
TASKS = [*FIT_TASKS, "test_time", "throughput", "base_models", "reward_spread"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def log_mel_db(samples) -> torch.Tensor:
    """(B, 32, T) log-mel in dB (the mel codec's filterbank) of decoded clips, for the diversity measure."""
    from diffalign.modalities.audio import MelCodec

    codec = MelCodec()
    power = codec.mel(samples.audio.float())[..., : codec.frames(samples.audio.shape[-1])]
    return 10 * torch.log10(power + 1e-6)[:, 0]


@torch.no_grad()
def side_metrics(policy, pairs: list[tuple[str, int]], reward=None, batch_size: int = 32) -> dict:
    """Reward terms, note accuracy, LUFS and per-prompt diversity of `policy`'s samples on `pairs`, and
    the run's own `reward` ("reward") when given: their means, and under "values" every sample's score
    in the pairs' order (for the paired standard errors)."""
    from diffalign.core.sampling import sample_pairs
    from diffalign.rewards.audio import LoudnessLUFS, PitchAccuracy, TimbreFidelity

    terms = {
        "pitch_accuracy": PitchAccuracy(),
        "timbre_fidelity": TimbreFidelity(),
        "lufs_error": LoudnessLUFS(),
    }
    policy.eval()
    if reward is not None:
        terms["reward"] = reward
    values: dict[str, list[torch.Tensor]] = {k: [] for k in [*terms, "note_accuracy", "lufs"]}
    mels: dict[str, list[torch.Tensor]] = {}
    for batch in sample_pairs(policy, pairs, batch_size):
        samples = batch.samples()
        for name, reward in terms.items():
            out = reward(samples, batch.cond)
            values[name].append(out.scores.cpu())
            if name == "pitch_accuracy":
                values["note_accuracy"].append(out.info["note_accuracy"].cpu())
            if name == "lufs_error":
                values["lufs"].append(out.info["lufs"].cpu())
        for prompt, mel in zip(batch.cond.prompts, log_mel_db(samples).cpu(), strict=True):
            mels.setdefault(str(prompt), []).append(mel)
    per_sample = {k: torch.cat(v).double() for k, v in values.items()}
    per_sample["lufs_error"] = -per_sample["lufs_error"]  # the reward is −|error|: report the error in LU
    out: dict = {k: v.mean().item() for k, v in per_sample.items()}
    out["values"] = {k: v.tolist() for k, v in per_sample.items()}
    dists = []
    for group in mels.values():
        stack = torch.stack(group)
        for i in range(len(stack)):
            for j in range(i + 1, len(stack)):
                dists.append((stack[i] - stack[j]).abs().mean().item())
    out["diversity_db"] = sum(dists) / max(1, len(dists))
    return out


def _backbone_weights(config: dict) -> str:
    backbone = config["model"]["init_args"]["policy"]["init_args"]["backbone"]
    weights = (backbone.get("init_args") or {}).get("weights")
    if not weights:
        raise ValueError("the run's backbone has no `weights` to compare against")
    return weights


def make_feedback(folder: Path, extra: list[str]) -> Path:
    from diffalign.core.cli import cli_main

    out = folder / "feedback_pitch"
    rc = cli_main(
        [
            "feedback",
            "--config",
            str(REPO / "recipes/audio/feedback_pitch.yaml"),
            "--output",
            str(out),
            *extra,
        ]
    )
    if rc != 0:
        raise RuntimeError(f"diffalign feedback failed with {rc}")
    return out / "pairs.jsonl"


def run_fit(name: str, extra: list[str], feedback_extra: list[str], root: Path) -> dict:
    import yaml

    from diffalign.core.cli import cli_main
    from diffalign.core.io import load_state_dict

    recipe = FIT_TASKS[name]
    args = ["fit", "--config", str(REPO / recipe), "--run_root", str(root / "runs"), *QUIET, *extra]
    t0 = time.perf_counter()
    if name == "dpo_pitch":
        pairs = make_feedback(root, feedback_extra)
        args.append(f"--data.init_args.path={pairs}")
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "summary.json").read_text())
    pairs = cli.datamodule.evaluation_set()
    reward = cli.model.reward
    after = side_metrics(cli.model.policy, pairs, reward)
    base = copy.deepcopy(cli.model.policy)
    load_state_dict(base.backbone, _backbone_weights(yaml.safe_load((run / "config.yaml").read_text())))
    before = side_metrics(base, pairs, reward)
    n = summary["eval_samples"]
    se = math.sqrt((summary["reward_before_std"] ** 2 + summary["reward_after_std"] ** 2) / n)
    paired: dict[str, float] = {}  # flat {term: gain, term_se: its SE}, the layout of the recorded rows
    for key, (gain, gain_se) in paired_gains(before.pop("values"), after.pop("values")).items():
        paired[key], paired[f"{key}_se"] = gain, gain_se
    return {
        "task": name,
        "recipe": recipe,
        "reward": summary["reward_name"],
        "reward_before": summary["reward_before"],
        "reward_after": summary["reward_after"],
        "gain": summary["reward_after"] - summary["reward_before"],
        "gain_standard_error": se,  # unpaired: as if before and after were independent samples
        "paired_gain": paired,  # every measured term: mean per-pair difference and its standard error
        "eval_samples": n,
        "eval_seeds_per_prompt": n // len({str(p) for p, _ in pairs}),
        "reward_queries": summary["reward_queries"],
        "optimizer_steps": summary["global_step"],
        "train_wall_seconds": summary["wall_seconds"],
        "total_wall_seconds": round(wall, 1),
        "before": before,
        "after": after,
    }


def run_test_time(extra: list[str], root: Path) -> list[dict]:
    from diffalign.core.cli import cli_main

    rows = []
    for name in ("sample_plain", "sample_best_of_n", "sample_fk"):
        out = root / name
        args = ["sample", "--config", str(REPO / f"recipes/audio/{name}.yaml"), "--output", str(out)]
        if cli_main([*args, "--progress", "false", *extra]) != 0:
            raise RuntimeError(f"diffalign sample {name} failed")
        res = json.loads((out / "results.json").read_text())
        scores = torch.tensor([r["reward"] for r in res["rows"] if math.isfinite(r["reward"])])
        rows.append(
            {
                "task": "test_time",
                "method": name,
                "reward": res["reward_name"],
                "reward_mean": res["reward_mean"],
                "reward_standard_error": scores.std().item() / math.sqrt(len(scores)),
                "samples": res["samples"],
                "nfe_per_sample": res["nfe_per_sample"],
                "wall_seconds": res["wall_seconds"],
            }
        )
    return rows


@torch.no_grad()
def run_throughput(batch_size: int = 32, repeats: int = 2) -> list[dict]:
    from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sampling import sample_batch
    from diffalign.modalities.audio import MelBackbone, WaveformBackbone, note_prompts

    prompts = (note_prompts() * 2)[:batch_size]
    rows = []
    for name, backbone, kernel in (
        ("mel (UNet2D + Griffin-Lim)", MelBackbone(), DDIMKernel(eta=1.0)),
        ("waveform (UNet1D)", WaveformBackbone(), FlowSDEKernel(noise_level=0.7)),
    ):
        policy = DiffusionPolicy(backbone, kernel, num_steps=10).eval()
        cond = backbone.condition({"prompt": prompts})
        times, decode_times = [], []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            batch = sample_batch(policy, cond, list(range(r * 1000, r * 1000 + batch_size)))
            t1 = time.perf_counter()
            batch.samples()
            t2 = time.perf_counter()
            if r:  # the first run warms up
                times.append(t2 - t0)
                decode_times.append(t2 - t1)
        rows.append(
            {
                "task": "throughput",
                "backbone": name,
                "parameters": sum(p.numel() for p in backbone.parameters()),
                "batch_size": batch_size,
                "num_steps": 10,
                "samples_per_second": batch_size / (sum(times) / len(times)),
                "audio_seconds_per_second": batch_size * 0.256 / (sum(times) / len(times)),
                "decode_share": sum(decode_times) / sum(times),
            }
        )
    return rows


@torch.no_grad()
def run_base_models() -> list[dict]:
    from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sampling import sample_pairs, seed_pairs
    from diffalign.modalities.audio import MelBackbone, WaveformBackbone, note_prompts
    from diffalign.rewards.audio import LoudnessLUFS, PitchAccuracy, TimbreFidelity

    levels = [
        f"a {n} {t} note, {lv}" for n in ("C4", "G4") for t in ("sine", "square") for lv in ("quiet", "loud")
    ]
    pitch, timbre, lufs = PitchAccuracy(), TimbreFidelity(), LoudnessLUFS()
    rows = []
    for name, policy in (
        ("mel", DiffusionPolicy(MelBackbone(), DDIMKernel(eta=1.0), num_steps=10)),
        ("waveform", DiffusionPolicy(WaveformBackbone(), FlowSDEKernel(noise_level=0.7), num_steps=10)),
    ):
        policy.eval()
        notes, timbres = [], []
        for batch in sample_pairs(policy, seed_pairs(note_prompts(), 2, 10_000), 32):
            samples = batch.samples()
            notes.append(pitch(samples, batch.cond).info["note_accuracy"])
            timbres.append(timbre(samples, batch.cond).info["timbre_accuracy"])
        level, quiet = [], []
        for batch in sample_pairs(policy, seed_pairs(levels, 3, 10_000), 24):
            level.append(lufs(batch.samples(), batch.cond).info["lufs"])
            quiet += [str(p).endswith("quiet") for p in batch.cond.prompts]
        level_t, q = torch.cat(level), torch.tensor(quiet)
        rows.append(
            {
                "task": "base_models",
                "backbone": name,
                "note_accuracy": torch.cat(notes).mean().item(),
                "timbre_accuracy": torch.cat(timbres).mean().item(),
                "samples": len(torch.cat(notes)),
                "lufs_quiet": level_t[q].mean().item(),
                "lufs_quiet_standard_error": level_t[q].std().item() / math.sqrt(int(q.sum())),
                "lufs_loud": level_t[~q].mean().item(),
                "lufs_loud_standard_error": level_t[~q].std().item() / math.sqrt(int((~q).sum())),
            }
        )
    return rows


@torch.no_grad()
def run_reward_spread(seeds_per_prompt: int = 8) -> list[dict]:
    """Where the mel base's `PitchAccuracy` varies (32 single-note prompts × 8 seeds, as the recipes sample):
    within a prompt vs across prompt means (do per-prompt baselines matter?), and its within-prompt
    correlation with voicing and with loudness (does the pitch reward ask for level?)."""
    from diffalign.core.kernels import DDIMKernel
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sampling import sample_pairs, seed_pairs
    from diffalign.modalities.audio import MelBackbone, note_prompts
    from diffalign.rewards.audio import LoudnessLUFS, PitchAccuracy

    policy = DiffusionPolicy(MelBackbone(), DDIMKernel(eta=1.0), num_steps=10).eval()
    prompts, pitch, lufs = note_prompts(), PitchAccuracy(), LoudnessLUFS()
    r, voiced, level = [], [], []
    for batch in sample_pairs(policy, seed_pairs(prompts, seeds_per_prompt, 50_000), 64):
        samples = batch.samples()
        out = pitch(samples, batch.cond)
        r.append(out.scores)
        voiced.append(out.info["voiced"].float())
        level.append(lufs(samples, batch.cond).info["lufs"])
    shape = (len(prompts), seeds_per_prompt)
    r, voiced, level = (torch.cat(x).double().view(shape) for x in (r, voiced, level))

    def within_corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return ((a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())).item()

    v = voiced > 0.5
    return [
        {
            "task": "reward_spread",
            "samples": r.numel(),
            "reward_mean": r.mean().item(),
            "within_prompt_variance": r.var(dim=1).mean().item(),
            "variance_of_prompt_means": r.mean(1).var().item(),
            "corr_reward_voiced_within_prompt": within_corr(r, voiced),
            "corr_reward_lufs_within_prompt": within_corr(r, level),
            "voiced_share": v.double().mean().item(),
            "lufs_voiced": level[v].mean().item(),
            "lufs_unvoiced": level[~v].mean().item(),
        }
    ]


def print_tables(rows: list[dict]) -> None:
    fits = [r for r in rows if r["task"] in FIT_TASKS]
    if fits:
        head = (
            "| task | reward | before | after | gain (paired ±2 SE; unpaired ±2 SE) | pitch acc. | note acc. "
            "| timbre | LUFS error (LU) | diversity (dB) | samples | steps | wall s |"
        )
        print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
        for r in fits:
            b, a, pg = r["before"], r["after"], r.get("paired_gain", {})

            def moved(key: str, fmt: str, b=b, a=a, pg=pg) -> str:
                cell = f"{b[key]:{fmt}} → {a[key]:{fmt}}"
                return cell + (f" ({pg[key]:+{fmt}} ±{2 * pg[key + '_se']:{fmt}})" if key in pg else "")

            paired = f"±{2 * pg['reward_se']:.4f}; " if "reward" in pg else ""
            print(
                f"| {r.get('key', r['task'])} | {r['reward']} | {r['reward_before']:.4f} | "
                f"{r['reward_after']:.4f} | "
                f"{r['gain']:+.4f} ({paired}unpaired ±{2 * r['gain_standard_error']:.4f}) | "
                f"{moved('pitch_accuracy', '.3f')} | {moved('note_accuracy', '.3f')} | "
                f"{moved('timbre_fidelity', '.3f')} | {moved('lufs_error', '.2f')} | "
                f"{b['diversity_db']:.2f} → {a['diversity_db']:.2f} | "
                f"{r['eval_samples']} | {r['optimizer_steps']} | {r['train_wall_seconds']:.0f} |"
            )
    tt = [r for r in rows if r["task"] == "test_time"]
    if tt:
        print(
            "\n| method | reward | mean (±2 SE) | NFE per sample | samples | wall s |"
            "\n|---|---|---|---|---|---|"
        )
        for r in tt:
            print(
                f"| {r['method']} | {r['reward']} | "
                f"{r['reward_mean']:.4f} (±{2 * r['reward_standard_error']:.4f}) | "
                f"{r['nfe_per_sample']:.0f} | {r['samples']} | {r['wall_seconds']:.0f} |"
            )
    bm = [r for r in rows if r["task"] == "base_models"]
    if bm:
        print(
            "\n| base model | note acc. | timbre acc. | samples | LUFS quiet (−34) | LUFS loud (−18) |"
            "\n|---|---|---|---|---|---|"
        )
        for r in bm:
            print(
                f"| {r['backbone']} | {r['note_accuracy']:.3f} | {r['timbre_accuracy']:.3f} | "
                f"{r['samples']} | "
                f"{r['lufs_quiet']:.1f} ± {r['lufs_quiet_standard_error']:.1f} | "
                f"{r['lufs_loud']:.1f} ± {r['lufs_loud_standard_error']:.1f} |"
            )
    for r in (r for r in rows if r["task"] == "reward_spread"):
        print(
            f"\nmel base, PitchAccuracy over {r['samples']} samples: mean {r['reward_mean']:.3f}, "
            f"variance within a prompt {r['within_prompt_variance']:.3f} "
            f"vs of prompt means {r['variance_of_prompt_means']:.3f}; "
            f"within-prompt correlation with voicing {r['corr_reward_voiced_within_prompt']:.2f}, with LUFS "
            f"{r['corr_reward_lufs_within_prompt']:.2f}; LUFS voiced {r['lufs_voiced']:.1f}, "
            f"unvoiced {r['lufs_unvoiced']:.1f}"
        )
    tp = [r for r in rows if r["task"] == "throughput"]
    if tp:
        print("\n| backbone | parameters | samples/s | audio s per s | decode share |\n|---|---|---|---|---|")
        for r in tp:
            print(
                f"| {r['backbone']} | {r['parameters']:,} | {r['samples_per_second']:.2f} | "
                f"{r['audio_seconds_per_second']:.2f} | {r['decode_share']:.0%} |"
            )


def write_rows(rows: list[dict], out_path: Path) -> None:
    """Write `rows` into the results file, keeping its rows of other keys (tasks or variants not run now)."""
    save_rows(out_path, "rows", rows, order=lambda r: TASKS.index(r["task"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["ddpo_pitch"], choices=TASKS)
    ap.add_argument(
        "--max-epochs", type=int, default=None, help="override the fit recipes' trainer.max_epochs"
    )
    ap.add_argument(
        "--feedback-seeds", type=int, default=None, help="override feedback_pitch's seeds_per_prompt"
    )
    ap.add_argument(
        "--sample-seeds", type=int, default=None, help="override the sampling recipes' seeds_per_prompt"
    )
    ap.add_argument("--out", default=str(RESULTS / "audio_alignment.json"))
    ap.add_argument("--merge", nargs="+", default=None, help="run nothing: merge these results into --out")
    ap.add_argument(
        "--label", default=None, help="the JSON key suffix of an exploratory row (default: its overrides)"
    )
    ap.add_argument(
        "--record",
        action="store_true",
        help="write rows run with overrides under the plain task name (without it: `task@label`)",
    )
    ap.add_argument("overrides", nargs="*", help="extra `diffalign fit` arguments (after --)")
    args = ap.parse_args(argv)
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())["rows"]]
        print_tables(rows)
        write_rows(rows, Path(args.out))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extra = [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    extra += list(args.overrides)
    feedback_extra = [f"--seeds_per_prompt={args.feedback_seeds}"] if args.feedback_seeds else []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            if name in FIT_TASKS:
                rows.append(run_fit(name, extra, feedback_extra, Path(tmp) / name))
            elif name == "test_time":
                seeds = [f"--seeds_per_prompt={args.sample_seeds}"] if args.sample_seeds else []
                rows += run_test_time(seeds, Path(tmp))
            elif name == "base_models":
                rows += run_base_models()
            elif name == "reward_spread":
                rows += run_reward_spread()
            else:
                rows += run_throughput()
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    for r in rows:
        r.update(machine=machine, max_epochs_override=args.max_epochs, overrides=list(args.overrides))
        seeds = []
        if r["task"] == "test_time":
            r.update(sample_seeds_override=args.sample_seeds)
            seeds = [f"sample_seeds={args.sample_seeds}"] if args.sample_seeds else []
        if r["task"] == "dpo_pitch":
            r.update(feedback_seeds_override=args.feedback_seeds)
            seeds = [f"feedback_seeds={args.feedback_seeds}"] if args.feedback_seeds else []
        r["key"] = row_key(r["task"], seeds + list(args.overrides), args.max_epochs, args.label, args.record)
    print_tables(rows)
    write_rows(rows, Path(args.out))


if __name__ == "__main__":
    main()
