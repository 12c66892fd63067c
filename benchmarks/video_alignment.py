"""Video alignment on CPU: reward before/after per recipe, test-time methods at equal NFE, and the memory and
time of reward backprop with one decoded frame vs all frames.

    python benchmarks/video_alignment.py alignment                 # every fit recipe below
    python benchmarks/video_alignment.py alignment --tasks grpo_motion --max-epochs 2   # row grpo_motion@...
    python benchmarks/video_alignment.py alignment --tasks grpo_motion --label kl \
        --model.init_args.algorithm.init_args.kl_coef=0.04                             # row grpo_motion@kl
    python benchmarks/video_alignment.py test_time                 # plain vs best-of-4 vs FK (4 particles)
    python benchmarks/video_alignment.py memory                    # one frame vs all frames, two backbones

Reduced settings for a small CPU budget (what docs/modalities/video.md's table used): `--eval-seeds 2`
(16 prompts x 2 seeds), `--no-pictures` (no ClipGrid GIFs), `--feedback-seeds 4`, `--max-epochs 2`,
`--test-time-seeds 2`, `--wan-frames 17 --wan-size 64`.

alignment: each task runs its recipe through the CLI (`diffalign fit`, in-process) into a run folder (a
temporary one unless `--run-root DIR`, which keeps them: metrics.csv, summary.json) and reads
`summary.json` (the recipe's reward before/after over its fixed evaluation set, 16 prompts × 8 seeds =
128 clips; `--eval-seeds` fewer). On the same (prompt, seed) pairs it then samples the base and the
aligned model again and scores every clip with the recipe's reward and every video reward — per-frame
digit fidelity and accuracy, motion agreement, the motion classifier, temporal flicker, subject
consistency — and the motion magnitude (pixels per frame), so a gain bought by static or collapsed clips
shows. Each pair is sampled from its own seed, so base and aligned clip i share their noise, and every
gain is reported twice: `gain_standard_error` is the unpaired √(SE_before² + SE_after²) of the two
means, `paired_gain` / `gain_paired_standard_error` the mean and SE of the per-clip differences (the
seed noise both share cancels). `dpo_motion` first makes its AI-feedback pairs with `diffalign feedback`
(recipes/video/feedback_motion.yaml), or reuses `--feedback <run-root>/feedback_motion/pairs.jsonl`.

A row is saved under its task name; a run with extra overrides (any `diffalign fit` argument after the
options, or `--max-epochs`) is exploratory and saved under `task@<label>` (`--label`, default the
overrides), so it never replaces a recorded row, unless `--record` is given.

test_time: `diffalign sample` with recipes/video/sample_{plain,best_of_n,fk}.yaml (MotionAgreement), the
same 128 (prompt, seed) pairs; reward, NFE per clip, wall time, and the other metrics of the chosen clips.

memory: one DRaFT-1 step (sample with the graph through the last step, decode, score, backward) per
configuration, each in a fresh process; peak resident memory during the step above the resident memory
just before it (`PeakRSS`, sampled every millisecond) and CPU time of the step. Backbones: the shipped
moving-digit model (8 × 16 × 16, batch 16, `FrameDigitFidelity`) and a random-weight Wan 2.1 pipeline of
the real classes (33 frames of 128 × 128 unless `--wan-frames/--wan-size`, batch 2, a per-frame
brightness reward), decoding one random frame, (Wan) frame 0 only, and all frames.

Writes benchmarks/results/video_alignment.json (rows of tasks not run this time are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
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
OUT = RESULTS / "video_alignment.json"
TASKS = {
    "grpo_motion": "recipes/video/grpo_motion.yaml",
    "draft_frame_fidelity": "recipes/video/draft_frame_fidelity.yaml",
    "alignprop_frame_fidelity": "recipes/video/alignprop_frame_fidelity.yaml",
    "alignprop_multi_reward": "recipes/video/alignprop_multi_reward.yaml",
    "dpo_motion": "recipes/video/dpo_motion.yaml",
    "grpo_multi_reward": "recipes/video/grpo_multi_reward.yaml",
    "nft_motion": "recipes/video/nft_motion.yaml",
    "nft_multi_reward": "recipes/video/nft_multi_reward.yaml",
}
TEST_TIME = {
    "plain": "recipes/video/sample_plain.yaml",
    "best_of_4": "recipes/video/sample_best_of_n.yaml",
    "fk_4_particles": "recipes/video/sample_fk.yaml",
}
PER_CLIP_KEYS = ("before", "after", "per_clip")  # left out of the one-line row print
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.float()
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def summarise(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-clip values → name → [mean, SE over the clips]."""
    return {k: list(_mean_se(torch.tensor(v))) for k, v in values.items()}


@torch.no_grad()
def clip_metrics_of(clips: torch.Tensor, prompts: list) -> dict[str, list[float]]:
    """Every video reward (and its diagnostics) of decoded clips (N, F, 3, H, W): name → [mean, SE]."""
    return summarise(clip_values(clips, prompts))


@torch.no_grad()
def clip_values(clips: torch.Tensor, prompts: list) -> dict[str, list[float]]:
    """Every video reward (and its diagnostics) of decoded clips (N, F, 3, H, W), per clip."""
    from diffalign.rewards.video import (
        FrameDigitFidelity,
        MotionAgreement,
        MotionClassifierReward,
        SubjectConsistency,
        TemporalFlicker,
    )

    cond = {"prompt": list(prompts)}
    out: dict[str, torch.Tensor] = {}
    fid = FrameDigitFidelity(frames="all")(clips, cond)
    out["frame_digit_fidelity"], out["digit_accuracy"] = fid.scores, fid.info["digit_accuracy"]
    mot = MotionAgreement()(clips, cond)
    out["motion_agreement"], out["motion_px"], out["com_error_px"] = (
        mot.scores,
        mot.info["motion_px"],
        mot.info["com_error_px"],
    )
    cls = MotionClassifierReward()(clips, cond)
    out["motion_classifier"], out["motion_accuracy"] = cls.scores, cls.info["motion_accuracy"]
    out["temporal_flicker"] = TemporalFlicker()(clips, cond).scores
    out["subject_consistency"] = SubjectConsistency()(clips, cond).scores
    out["pixel_mean"] = clips.float().mean(dim=(1, 2, 3, 4))  # over-exposure shows here
    return {k: v.float().tolist() for k, v in out.items()}


@torch.no_grad()
def policy_values(policy, pairs: list, reward=None, batch_size: int = 64) -> dict[str, list[float]]:
    """Sample `pairs` (each from its own seed, so two policies get the same noise per pair) and return
    every video metric per clip, plus `trained_reward` (the recipe's reward, as `RewardEvaluation`
    scores it: batches of 64) when `reward` is given."""
    from diffalign.core.sampling import sample_pairs

    policy.eval()
    clips, prompts, scores = [], [], []
    for batch in sample_pairs(policy, pairs, batch_size, reward=reward):
        clips.append(batch.samples().float().cpu())
        prompts += list(batch.cond.prompts)
        if reward is not None:
            scores += batch.scores.tolist()
    values = clip_values(torch.cat(clips), prompts)
    if reward is not None:
        values["trained_reward"] = scores
    return values


def _start_weights(run: Path) -> str:
    """The base weights the run started from (inside a `LoRABackbone`, its wrapped backbone's)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    backbone = cfg["model"]["init_args"]["policy"]["init_args"]["backbone"]
    while (backbone.get("init_args") or {}).get("backbone"):
        backbone = backbone["init_args"]["backbone"]
    return (backbone.get("init_args") or {})["weights"]


def _base_policy(policy, weights: str):
    """A copy of `policy` at its start weights: LoRA adapters zeroed (B = 0, their initial value, so the
    adapted network equals the frozen base), or the full backbone reloaded from `weights`."""
    from diffalign.core.io import load_state_dict
    from diffalign.core.lora import LoRABackbone

    base = copy.deepcopy(policy)
    if isinstance(base.backbone, LoRABackbone):
        with torch.no_grad():
            for name, p in base.backbone.inner.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    else:
        load_state_dict(base.backbone, weights)
    return base


def make_feedback(folder: Path, seeds_per_prompt: int | None = None) -> Path:
    from diffalign.core.cli import cli_main

    out = folder / "feedback_motion"
    args = ["feedback", "--config", str(REPO / "recipes/video/feedback_motion.yaml"), "--output", str(out)]
    if seeds_per_prompt:
        args.append(f"--seeds_per_prompt={seeds_per_prompt}")
    args += ["--progress", "false"]
    assert cli_main(args) == 0
    return out / "pairs.jsonl"


def run_alignment(
    name: str,
    extra: list[str],
    tmp: Path,
    base_cache: dict,
    feedback_seeds: int | None = None,
    feedback: Path | None = None,
) -> dict:
    """Train one task's recipe and measure base vs aligned on its evaluation pairs (per clip, paired)."""
    from diffalign.core.cli import cli_main

    recipe = TASKS[name]
    args = ["fit", "--config", str(REPO / recipe), "--run_root", str(tmp / "runs" / name), *QUIET, *extra]
    if name == "dpo_motion":
        args.append(f"--data.init_args.path={feedback or make_feedback(tmp, feedback_seeds)}")
    t0 = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "summary.json").read_text())
    pairs = cli.datamodule.evaluation_set()
    reward = cli.model.reward
    after = policy_values(cli.model.policy, pairs, reward)
    weights = _start_weights(run)
    cache_key = (weights, reward.name, tuple(map(tuple, pairs)))
    if cache_key not in base_cache:
        base_cache[cache_key] = policy_values(_base_policy(cli.model.policy, weights), pairs, reward)
    before = base_cache[cache_key]
    n = summary["eval_samples"]
    se = math.sqrt(summary["reward_before_std"] ** 2 / n + summary["reward_after_std"] ** 2 / n)
    paired = paired_gains(before, after)
    return {
        "task": name,
        "recipe": recipe,
        "reward": summary["reward_name"],
        "reward_before": summary["reward_before"],
        "reward_after": summary["reward_after"],
        "gain": summary["reward_after"] - summary["reward_before"],
        # unpaired: √(SE_before² + SE_after²) of summary.json's two means (the clips' spread over the set)
        "gain_standard_error": se,
        # paired: the SE of the per-clip differences after − before on the same (prompt, seed) pairs
        "gain_paired": paired["trained_reward"][0],
        "gain_paired_standard_error": paired["trained_reward"][1],
        "eval_samples": n,
        "reward_queries": summary["reward_queries"],
        "optimizer_steps": summary["global_step"],
        "train_wall_seconds": summary["wall_seconds"],
        "total_wall_seconds": round(wall, 1),
        "base_weights": weights,
        "run_dir": str(run),
        "before": summarise(before),
        "after": summarise(after),
        "paired_gain": paired,
        "per_clip": {  # in evaluation-pair order, for recomputing any paired figure
            side: {k: [round(x, 5) for x in v] for k, v in vals.items()}
            for side, vals in (("before", before), ("after", after))
        },
    }


def run_test_time(name: str, tmp: Path, seeds_per_prompt: int | None = None) -> dict:
    from diffalign.core.cli import cli_main
    from diffalign.modalities.video.io import iter_clips

    out = tmp / name
    args = ["sample", "--config", str(REPO / TEST_TIME[name]), "--output", str(out), "--progress", "false"]
    if seeds_per_prompt:
        args.append(f"--seeds_per_prompt={seeds_per_prompt}")
    t0 = time.perf_counter()
    assert cli_main(args) == 0
    wall = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    rows = [(clip, prompt) for _, clip, prompt in iter_clips(out / "clips")]  # the chosen clips, as GIFs
    clips = torch.stack([c for c, _ in rows])
    rewards = torch.tensor([r["reward"] for r in results["rows"]])
    return {
        "method": name,
        "recipe": TEST_TIME[name],
        "results": {k: v for k, v in results.items() if not isinstance(v, list)},
        "reward_mean_se": list(_mean_se(rewards)),
        "metrics": clip_metrics_of(clips, [p for _, p in rows]),
        "wall_seconds": round(wall, 1),
        "seeds_per_prompt": seeds_per_prompt,
    }


# -- memory: one reward-backprop step per fresh process -------------------------------------------
def _rss_mb() -> float:
    """The process's resident memory now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The highest resident memory seen while the block runs (a thread samples /proc every millisecond):
    unlike ru_maxrss, not hidden by a higher peak earlier in the process (imports, weight loading)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()

        def poll() -> None:
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, _rss_mb())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _release_memory() -> None:
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # freed heap back to the OS: the step's growth shows
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_worker(
    backbone: str, frames: str, folder: str | None, wan_frames: int = 33, wan_size: int = 128
) -> dict:
    torch.set_num_threads(1)
    request_frames = [0] if frames == "first" else frames
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.reward import GuardedReward
    from diffalign.core.reward_backprop import reward_loss
    from diffalign.core.sampling import sample_batch

    if backbone == "moving_digits":
        from diffalign.modalities.video import EVAL_PROMPTS, moving_digits_backbone
        from diffalign.rewards.video import FrameDigitFidelity

        bb = moving_digits_backbone("flow")
        prompts = list(EVAL_PROMPTS)
        reward = FrameDigitFidelity(frames=request_frames)
        steps = 10
    else:
        from diffalign.core.reward import FunctionReward
        from diffalign.modalities.video.wan import WanBackbone
        from diffalign.rewards.video import FrameImageReward

        bb = WanBackbone(
            folder, num_frames=wan_frames, height=wan_size, width=wan_size, max_sequence_length=8
        )
        prompts = ["a cat video", "a dog video"]
        brightness = FunctionReward("benchmarks.video_alignment.frame_brightness", differentiable=True)
        reward = FrameImageReward(brightness, frames=request_frames)
        steps = 4
    from diffalign.core.kernels import FlowSDEKernel

    policy = DiffusionPolicy(bb, FlowSDEKernel(0.7), num_steps=steps)
    cond = bb.condition({"prompt": prompts})
    seeds = list(range(len(prompts)))
    guarded = GuardedReward(reward)
    with torch.no_grad():  # warm up every path once, so the step measures activations, not lazy setup
        sample_batch(policy, cond[:1], seeds[:1]).view.get(reward.request)
    _release_memory()
    before = _rss_mb()
    t0 = time.process_time()
    with PeakRSS() as rss:
        sampled = sample_batch(policy, cond, seeds, grad_steps=1)
        out = reward_loss(policy, guarded, sampled.x0, sampled.mask, sampled.cond, 1.0)
        out["loss"].backward()
    cpu = time.process_time() - t0
    return {
        "backbone": backbone,
        "frames": frames,
        "clip_shape": list(sampled.x0.shape),
        "batch": len(prompts),
        "peak_extra_mb": round(rss.peak - before, 1),
        "step_cpu_seconds": round(cpu, 2),
    }


def frame_brightness(images, cond):
    """A differentiable per-image reward for the memory benchmark (mean intensity)."""
    return images.mean(dim=(1, 2, 3))


def run_memory(
    tmp: Path, wan_frames: int = 33, wan_size: int = 128, backbones: tuple = ("moving_digits", "wan_random")
) -> list[dict]:
    from diffalign.modalities.video.wan import save_tiny_wan_pipeline

    folder = save_tiny_wan_pipeline(tmp / "wan_bench", vae_base_dim=16, num_heads=4, num_layers=2)
    rows = []
    for backbone in backbones:
        for frames in ("random", "first", "all") if backbone == "wan_random" else ("random", "all"):
            cmd = [sys.executable, __file__, "_memory_worker", backbone, frames, str(folder)]
            cmd += [str(wan_frames), str(wan_size)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for one in rows:
        if one["frames"] == "all":
            continue
        every = next(r for r in rows if r["backbone"] == one["backbone"] and r["frames"] == "all")
        one["memory_ratio_vs_all"] = round(one["peak_extra_mb"] / max(every["peak_extra_mb"], 1e-9), 3)
        one["time_ratio_vs_all"] = round(one["step_cpu_seconds"] / max(every["step_cpu_seconds"], 1e-9), 3)
    return rows


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def print_alignment(rows: list[dict]) -> None:
    """The markdown table of alignment rows: the trained reward's gain with the unpaired and the paired
    2 SE, and the paired gain (± 2 SE) of the other metrics."""
    print(
        "\n| row | reward | before | after | gain (± 2 SE unpaired) | gain (± 2 SE paired) | fidelity "
        "| digit acc. | motion agreement | motion-classifier acc. | flicker | motion px/frame |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pg = r["paired_gain"]
        cells = [
            f"{r['after'][k][0]:.3f} ({pg[k][0]:+.3f} ± {2 * pg[k][1]:.3f})"
            for k in (
                "frame_digit_fidelity",
                "digit_accuracy",
                "motion_agreement",
                "motion_accuracy",
                "temporal_flicker",
                "motion_px",
            )
        ]
        print(
            f"| {r['key']} | {r['reward']} | {r['reward_before']:.4f} | {r['reward_after']:.4f} | "
            f"{r['gain']:+.4f} (± {2 * r['gain_standard_error']:.4f}) | "
            f"{r['gain_paired']:+.4f} (± {2 * r['gain_paired_standard_error']:.4f}) | "
            + " | ".join(cells)
            + " |"
        )


def _save(section: str, rows: list[dict], key: str) -> None:
    """Merge `rows` into OUT's `section` (rows of other keys kept; see `common.save_rows`)."""
    save_rows(OUT, section, rows, key)


def _fmt(m: list[float]) -> str:
    return f"{m[0]:.3f} ± {m[1]:.3f}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_memory_worker":
        sizes = [int(a) for a in argv[4:6]]
        print(json.dumps(memory_worker(argv[1], argv[2], argv[3] if len(argv) > 3 else None, *sizes)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["alignment", "test_time", "memory"])
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--max-epochs", type=int, default=None, help="override the recipes' trainer.max_epochs")
    ap.add_argument("--eval-seeds", type=int, default=None, help="evaluation seeds per prompt (recipes: 8)")
    ap.add_argument("--no-pictures", action="store_true", help="drop the recipes' ClipGrid GIF callback")
    ap.add_argument("--feedback-seeds", type=int, default=None, help="feedback groups per prompt (16)")
    ap.add_argument(
        "--feedback", type=Path, default=None, help="dpo_motion: reuse this pairs.jsonl instead of making it"
    )
    ap.add_argument("--test-time-seeds", type=int, default=None, help="seeds per prompt at test time (8)")
    ap.add_argument("--wan-frames", type=int, default=33)
    ap.add_argument("--wan-size", type=int, default=128)
    ap.add_argument("--run-root", default=None, help="keep run folders (metrics.csv, ...) here")
    ap.add_argument(
        "--label",
        default=None,
        help="alignment: the JSON key suffix of an exploratory row (default: the overrides themselves)",
    )
    ap.add_argument(
        "--record",
        action="store_true",
        help="alignment: write rows run with extra overrides or --max-epochs under the plain task name "
        "(without it they go under `task@label` and the recorded rows stay)",
    )
    args, overrides = ap.parse_known_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.run_root) if args.run_root else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.part == "alignment":
            extra = [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
            if args.eval_seeds:
                extra.append(f"--data.init_args.eval_seeds_per_prompt={args.eval_seeds}")
            if args.no_pictures:
                extra.append("--trainer.callbacks=[]")
            base_cache: dict = {}
            rows = []
            for t in args.tasks or list(TASKS):
                rows.append(
                    run_alignment(t, extra + overrides, tmp, base_cache, args.feedback_seeds, args.feedback)
                )
                print(
                    json.dumps({k: v for k, v in rows[-1].items() if k not in PER_CLIP_KEYS}),
                    flush=True,
                )
            for r in rows:
                r.update(
                    key=row_key(r["task"], overrides, args.max_epochs, args.label, args.record),
                    machine=machine(),
                    max_epochs_override=args.max_epochs,
                    overrides=extra + overrides,
                    feedback_seeds=args.feedback_seeds if r["task"] == "dpo_motion" else None,
                    feedback_file=str(args.feedback) if args.feedback and r["task"] == "dpo_motion" else None,
                )
            print_alignment(rows)
            _save("alignment", rows, "key")
        elif args.part == "test_time":
            rows = [run_test_time(t, tmp, args.test_time_seeds) for t in args.tasks or list(TEST_TIME)]
            for r in rows:
                r["machine"] = machine()
                m = r["metrics"]
                print(
                    r["method"],
                    r["results"].get("nfe_per_sample"),
                    _fmt(m["motion_agreement"]),
                    _fmt(m["motion_px"]),
                )
            _save("test_time", rows, "method")
        else:
            rows = run_memory(
                tmp, args.wan_frames, args.wan_size, tuple(args.tasks or ("moving_digits", "wan_random"))
            )
            for r in rows:
                r["machine"] = machine()
            _save("memory", [dict(r, key=f"{r['backbone']}/{r['frames']}") for r in rows], "key")


if __name__ == "__main__":
    main()
