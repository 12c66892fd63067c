#!/usr/bin/env python3
"""Stable Diffusion 1.5 at 512 px: diffalign beside TRL 0.23.1, on the identical workload, in one run.

    bash benchmarks/sd_gpu.sh                         # one H200: PRESET=sd15 DEVICE=cuda (see its header)
    DEVICE=cpu PRESET=tiny bash benchmarks/sd_gpu.sh  # the same on a CPU with the tiny pipeline (CI runs it)

Rows (in this order, each TRL then diffalign): DDPO with LoRA r = 4, AlignProp with LoRA and random
truncation, DDPO with full fine-tuning. Workload (preset sd15, TRL's H200 reference in
benchmarks/peer/README.md): a random-weight SD 1.5 architecture built by `benchmarks/peer/make_tiny_sd.py
--sd15`, 512 px, 50 DDIM steps, eta 1, CFG 5, 8 samples x 2 batches per epoch (AlignProp 4 x 2), all 50
steps trained, clip 1e-4, JPEG compressibility (AlignProp: target colour), bf16, 2 epochs of which the
first is warm-up. TRL runs through the peer scripts (`benchmarks/peer/run_trl_*.py`, unmodified); diffalign
through `AlignmentModule` under a Lightning `Trainer`, measured with the peer harness's own clock and
memory meter (`peer_common.Clock`, `split_phases`, `MemoryMeter`): sampling = denoising + VAE decode,
reward = inside the reward, train = the rest of the epoch; peak = `torch.cuda.max_memory_allocated` per
epoch on a GPU, the process's peak RSS on a CPU. Steady figures are the mean over epochs after the first.

Subcommands:
    run        the driver: builds the pipeline, runs every row in its own process under one time budget
               (rows that no longer fit are reported as skipped), prints one table, writes sd_gpu.json
    diffalign  one diffalign row (what `run` calls); writes the peer scripts' JSON layout
    levers     micro-benchmark of the speed options on the UNet / VAE (docs/performance.md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
PEER = Path(os.environ.get("PEER_DIR", REPO / "benchmarks" / "peer"))
ROWS = ("ddpo_lora", "alignprop_lora", "ddpo_full")
NOT_RUN = "not run (TRL not importable)"
# the least a row process needs: on one H200 an sd15 row is 55-75 s (start, load, 2 epochs; see sd_gpu.sh)
MIN_ROW_S = {"cuda": 75.0, "cpu": 45.0}
PRESETS: dict[str, dict[str, Any]] = {
    # the reference workload of benchmarks/peer/README.md
    "sd15": dict(
        resolution=512, steps=50, ddpo_batch=8, ddpo_batches=2, ap_batch=4, ap_accum=2, epochs=2, mp="bf16"
    ),
    # the same code paths on a CPU in seconds (the tiny pipeline: UNet 0.8 M parameters, 64 px)
    "tiny": dict(
        resolution=64, steps=4, ddpo_batch=2, ddpo_batches=2, ap_batch=2, ap_accum=2, epochs=2, mp="bf16"
    ),
}
# issue 17's targets on sd15 (diffalign / TRL in one run); the CPU tiny pipeline asks for >= 1.0 end-to-end
TARGETS = {
    "sd15": {
        "ddpo_lora": {"e2e": 1.3, "sampling": 1.5},
        "ddpo_full": {"e2e": 1.3, "sampling": 1.5},
        "alignprop_lora": {"e2e": 1.3, "peak_gib": 15.0},
    },
    "tiny": {"ddpo_lora": {"e2e": 1.0}, "ddpo_full": {"e2e": 1.0}, "alignprop_lora": {"e2e": 1.0}},
}


# ---------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------
def settings(a: argparse.Namespace) -> dict[str, Any]:
    s = dict(PRESETS[a.preset])
    for k in s:
        v = getattr(a, k, None)
        if v is not None:
            s[k] = v
    return s


def row_commands(
    row: str, s: dict[str, Any], a: argparse.Namespace, work: Path, tag: str
) -> dict[str, list[str]]:
    """The TRL and diffalign command lines of one row (same settings, one JSON each)."""
    py = sys.executable
    algo, mode = row.split("_")
    lora = ["--use-lora"] if mode == "lora" else ["--no-use-lora"]
    common = ["--model", str(a.model), "--device", a.device, "--mixed-precision", s["mp"]]
    common += [
        "--resolution",
        str(s["resolution"]),
        "--num-steps",
        str(s["steps"]),
        "--epochs",
        str(s["epochs"]),
    ]
    if a.threads:
        common += ["--threads", str(a.threads)]
    if algo == "ddpo":
        shape = ["--sample-batch-size", str(s["ddpo_batch"]), "--num-batches", str(s["ddpo_batches"])]
        trl = [py, str(PEER / "run_trl_ddpo.py"), *common, *shape, *lora, "--eval-batches", "0", "--quiet"]
    else:
        shape = ["--batch-size", str(s["ap_batch"]), "--grad-accum", str(s["ap_accum"])]
        trl = [py, str(PEER / "run_trl_alignprop.py"), *common, *shape, *lora, "--reward", "target_color"]
        trl += ["--eval-batches", "0", "--quiet"]
    ours = [py, str(Path(__file__).resolve()), "diffalign", "--algo", algo, *common, *shape, *lora]
    if a.profile and row == "ddpo_lora":
        ours.append("--profile")
    return {
        "trl": [*trl, "--out", str(work / f"trl_{row}{tag}.json")],
        "diffalign": [*ours, *a.diffalign_flags, "--out", str(work / f"diffalign_{row}{tag}.json")],
    }


class Budget:
    """The run's wall-clock budget: a step starts only if its minimum fits; each gets what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_step(cmd: list[str], env: dict[str, str], timeout: float, log) -> tuple[int, float]:
    """Run one subprocess (its output goes to the log and to stdout); returns (exit code, seconds)."""
    t0 = time.monotonic()
    log(f"$ {' '.join(cmd)}")
    try:
        p = subprocess.run(
            cmd, env=env, timeout=max(1.0, timeout), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, rc = p.stdout.decode(errors="replace"), p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace"), 124
    keep = [ln for ln in out.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    for ln in keep[-40:] if rc == 0 else keep[-120:]:
        log("    " + ln)
    if rc:
        log(f"    -> exit code {rc}{' (timed out)' if rc == 124 else ''}")
    return rc, time.monotonic() - t0


def summarise(path: Path) -> dict[str, Any] | None:
    """The figures of one row's JSON (peer layout), or None when it is missing."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    t, last = d["totals"], d["epochs"][-1]
    out = {
        "sampling_per_s": t["steady_samples_per_s_sampling"],
        "e2e_per_s": t["steady_samples_per_s_epoch"],
        "peak_gib": t["peak_mib"] / 1024,
        "peak_kind": t["peak_kind"],
        "warmup_epoch_s": d["epochs"][0]["epoch_s"],
        "steady_epoch_s": last["epoch_s"],
        "phases_last_epoch_s": {
            k: round(last[k], 3) for k in ("sampling_s", "reward_s", "train_s", "epoch_s")
        },
        "reward_first_last": [d["epochs"][0]["reward_mean"], last["reward_mean"]],
        "trainable_params": d["model"]["trainable_params"],
    }
    for k in ("first_update_ratio_dev", "clipfrac", "approx_kl"):
        vals = [e[k] for e in d["epochs"] if e.get(k) is not None]
        if vals:
            out[k] = max(vals) if k == "first_update_ratio_dev" else vals[0]
    out.update({k: d[k] for k in ("options", "sync_audit", "profile_top", "compile_s_estimate") if k in d})
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the numeric figures over repeats (the first run's other fields)."""
    out = dict(runs[0])
    for k in ("sampling_per_s", "e2e_per_s", "peak_gib"):
        out[k] = statistics.median(r[k] for r in runs)
    out["repeats"] = len(runs)
    return out


def ratios(trl: dict[str, Any] | None, ours: dict[str, Any] | None) -> dict[str, float] | None:
    if not trl or not ours:
        return None
    return {
        "sampling": ours["sampling_per_s"] / trl["sampling_per_s"],
        "e2e": ours["e2e_per_s"] / trl["e2e_per_s"],
        "peak": ours["peak_gib"] / trl["peak_gib"],
    }


def target_verdict(preset: str, row: str, r: dict[str, float] | None, ours: dict[str, Any] | None) -> str:
    want = TARGETS.get(preset, {}).get(row, {})
    if not want or r is None or ours is None:
        return "-"
    missed = []
    if "e2e" in want and r["e2e"] < want["e2e"]:
        missed.append(f"e2e {r['e2e']:.2f} < {want['e2e']}")
    if "sampling" in want and r["sampling"] < want["sampling"]:
        missed.append(f"sampling {r['sampling']:.2f} < {want['sampling']}")
    if "peak_gib" in want and ours["peak_gib"] > want["peak_gib"]:
        missed.append(f"peak {ours['peak_gib']:.1f} GiB > {want['peak_gib']}")
    return "met" if not missed else "missed: " + ", ".join(missed)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"SD benchmark | preset {result['preset']} | {result['device_name']} | "
        + ", ".join(f"{k} {v}" for k, v in result["settings"].items()),
        "",
        "| row | framework | sampling samples/s | end-to-end samples/s | peak GiB | diffalign/TRL sampling | "
        "diffalign/TRL end-to-end | diffalign/TRL peak | clipfrac (epoch 1) | max abs(ratio-1) before update "
        "| target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if result.get("peer", "").startswith("not run"):
        lines[2:2] = [f"PEER (TRL) NOT RUN: {result['peer'][len('not run: ') :]}", ""]

    def cell(x: Any, fmt: str = "{:.3g}") -> str:
        return "-" if x is None else fmt.format(x)

    for row, rec in result["rows"].items():
        r = rec.get("ratios") or {}
        for fw in ("trl", "diffalign"):
            m = rec.get(fw)
            if m is None:
                if fw in rec.get("status", {}):
                    lines.append(f"| {row} | {fw} | {rec['status'][fw]} | | | | | | | | |")
                continue
            ours = fw == "diffalign"
            cols = [
                row,
                fw,
                cell(m["sampling_per_s"]),
                cell(m["e2e_per_s"]),
                cell(m["peak_gib"], "{:.2f}"),
                cell(r.get("sampling"), "{:.2f}") if ours else "",
                cell(r.get("e2e"), "{:.2f}") if ours else "",
                cell(r.get("peak"), "{:.2f}") if ours else "",
                cell(m.get("clipfrac"), "{:.2f}"),
                cell(m.get("first_update_ratio_dev"), "{:.2g}") if ours else "",
                rec.get("target", "-") if ours else "",
            ]
            lines.append("| " + " | ".join(cols) + " |")
    if result.get("levers"):
        lines += [
            "",
            "Levers (median ms per call; first call includes compilation):",
            "",
            "| lever | forward ms | forward+backward ms | first call s | peak GiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for lv in result["levers"]:
            lines.append(
                f"| {lv['name']} | {lv.get('skipped') or cell(lv.get('forward_ms'), '{:.2f}')} | "
                f"{cell(lv.get('train_ms'), '{:.2f}')} | {cell(lv.get('first_call_s'), '{:.1f}')} | "
                f"{cell(lv.get('peak_gib'), '{:.2f}')} |"
            )
    if result.get("skipped"):
        lines += ["", "skipped (time budget): " + ", ".join(result["skipped"])]
    return "\n".join(lines)


def driver(a: argparse.Namespace) -> int:
    s = settings(a)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = out / "sd_gpu.log"
    budget = Budget(a.budget)

    def log(msg: str) -> None:
        print(msg, flush=True)
        with log_path.open("a") as f:
            f.write(msg + "\n")

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if a.peer_site:  # TRL (and, on the GPU, diffusers/peft) for every subprocess
        env["PYTHONPATH"] = os.pathsep.join(p for p in (a.peer_site, env.get("PYTHONPATH", "")) if p)
    log(
        f"== sd_gpu {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} preset={a.preset} "
        f"device={a.device} {s}"
    )

    # 1. the random-weight pipeline (reused when already built for this preset and resolution)
    info = a.model / "peer_build_info.json"
    built = json.loads(info.read_text()) if info.is_file() else {}
    if built.get("preset") != a.preset or built.get("resolution") != s["resolution"]:
        cmd = [
            sys.executable,
            str(PEER / "make_tiny_sd.py"),
            str(a.model),
            "--resolution",
            str(s["resolution"]),
        ]
        rc, secs = run_step(
            cmd + (["--sd15"] if a.preset == "sd15" else []), env, min(a.build_timeout, budget.left()), log
        )
        if rc:
            log("ERROR: could not build the pipeline")
            return 1
        log(f"== built {a.model} in {secs:.0f}s")

    result: dict[str, Any] = {
        "preset": a.preset,
        "device": a.device,
        "device_name": device_name(a.device),
        "settings": s,
        "diffalign_flags": a.diffalign_flags,
        "rows": {},
        "skipped": [],
        "budget_s": a.budget,
        "peer": f"not run: {a.peer_unavailable}" if a.peer_unavailable else "TRL 0.23.1",
        "load_average_at_start": os.getloadavg(),  # a shared machine's timings move with it
    }
    frameworks = [fw for fw in a.frameworks if not (a.peer_unavailable and fw == "trl")]
    if a.peer_unavailable:
        log(f"== THE PEER (TRL) IS NOT RUN: {a.peer_unavailable}; diffalign's rows only, no ratios")
        for row in a.rows:
            result["rows"][row] = {"status": {"trl": NOT_RUN}}
    plan = [(row, fw) for row in a.rows for fw in frameworks] + [
        (f"{row}:{flags}", "diffalign") for row, flags in a.extra
    ]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def collect() -> None:
        """Medians, ratios and targets of what has finished, into `result`."""
        for (row, fw), rs in runs.items():
            result["rows"][row][fw] = median_of(rs)
        for row, rec in result["rows"].items():
            base = row.split(":")[0]
            trl = result["rows"].get(base, {}).get("trl")
            rec["ratios"] = ratios(trl, rec.get("diffalign"))
            rec["target"] = target_verdict(a.preset, row, rec["ratios"], rec.get("diffalign"))  # extras: none

    def write() -> str:
        """sd_gpu.json and sd_gpu.md as they stand (after every row: a run cut short keeps its figures)."""
        text = table(result)
        (out / "sd_gpu.json").write_text(json.dumps(result, indent=1, default=repr) + "\n")
        (out / "sd_gpu.md").write_text(text + "\n")
        return text

    min_row_s = a.min_row_s if a.min_row_s is not None else MIN_ROW_S[a.device]
    for rep in range(a.repeats):
        for i, (row, fw) in enumerate(plan):
            base, _, flags = row.partition(":")
            # a TRL half starts only when its diffalign half fits after it: no ratio-less TRL figures
            pair = fw == "trl" and i + 1 < len(plan) and plan[i + 1] == (row, "diffalign")
            if budget.left() < min_row_s * (2 if pair else 1) + a.reserve_s:
                result["skipped"].append(f"{row}/{fw}#{rep}")
                continue
            tag = f"_{abs(hash(flags)) % 10**6}" if flags else ""
            cmds = row_commands(base, s, a, work, f"{tag}_r{rep}")
            cmd = cmds[fw] + (flags.split() if flags else [])
            log(f"== {row} / {fw} (repeat {rep + 1}/{a.repeats}, {budget.left():.0f}s left)")
            rc, secs = run_step(cmd, env, min(a.row_timeout, budget.left() - a.reserve_s), log)
            rec = result["rows"].setdefault(row, {"status": {}})
            path = Path(cmd[cmd.index("--out") + 1])
            summary = summarise(path) if rc == 0 else None
            rec["status"][fw] = (
                "ok" if summary else (f"timed out after {secs:.0f}s" if rc == 124 else f"failed (exit {rc})")
            )
            if summary:
                summary["process_s"] = secs
                if rep == 0:
                    summary["raw"] = json.loads(path.read_text())  # the row's whole JSON, kept in sd_gpu.json
                runs.setdefault((row, fw), []).append(summary)
            collect()
            write()

    # 2. the per-lever micro-benchmark, if time is left
    if a.levers and budget.left() > a.min_levers_s:
        lever_json = work / "levers.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "levers",
            "--model",
            str(a.model),
            "--device",
            a.device,
        ]
        cmd += [
            "--resolution",
            str(s["resolution"]),
            "--batch-size",
            str(s["ddpo_batch"]),
            "--out",
            str(lever_json),
        ]
        cmd += ["--budget", str(max(10.0, budget.left() - a.reserve_s - 15))] + (
            ["--threads", str(a.threads)] if a.threads else []
        )
        cmd += a.lever_flags
        log(f"== levers ({budget.left():.0f}s left)")
        rc, _ = run_step(cmd, env, budget.left() - a.reserve_s, log)
        if lever_json.is_file():
            result["levers"] = json.loads(lever_json.read_text())["levers"]
    elif a.levers:
        result["skipped"].append("levers")

    collect()
    result["load_average_at_end"] = os.getloadavg()
    text = write()
    log("\n" + text + f"\n\nwrote {out / 'sd_gpu.json'} and {out / 'sd_gpu.md'}")
    failed = [
        f"{row}/{fw}"
        for row, rec in result["rows"].items()
        for fw, st in rec["status"].items()
        if st not in ("ok", NOT_RUN)
    ]
    if failed:
        log("FAILED: " + ", ".join(failed))
    return 1 if failed else 0


def device_name(device: str) -> str:
    import platform

    if device == "cuda":
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - only a label
            return "cuda"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------
# one diffalign row
# ---------------------------------------------------------------------------------------------------
def build_diffalign(a: argparse.Namespace):
    """The AlignmentModule and data module of one row, with TRL's settings (benchmarks/peer/run_trl_*.py)."""
    from functools import partial

    import peer_common as pc
    import torch

    from diffalign.core.algorithms import DDPO, AlignProp
    from diffalign.core.data import PromptDataModule
    from diffalign.core.kernels import DDIMKernel
    from diffalign.core.lora import LoRABackbone
    from diffalign.core.module import AlignmentModule
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone
    from diffalign.rewards.image import JpegCompressibility, TargetColor

    bf16 = a.mixed_precision == "bf16"
    sd = StableDiffusionBackbone(
        str(a.model),
        resolution=a.resolution,
        dtype="bfloat16" if bf16 else "float32",  # frozen VAE and text encoder (TRL casts them too)
        gradient_checkpointing=a.checkpointing in ("unet", "both"),
        channels_last=a.channels_last,
        decode_chunk_size=a.decode_chunk_size,
    )
    # TRL: LoRA r = 4, alpha 4 on to_q/to_k/to_v/to_out.0 over a bf16 base (no autocast); full fine-tuning
    # casts the UNet to bf16 and autocasts. Here: LoRA over a bf16 base; full fine-tuning keeps float32
    # weights and AdamW state and autocasts the network to bf16 (policy.autocast).
    backbone = (
        LoRABackbone(sd, rank=4, alpha=4, base_dtype="bfloat16" if bf16 else None) if a.use_lora else sd
    )
    policy = DiffusionPolicy(
        backbone,
        DDIMKernel(eta=a.eta),
        num_steps=a.num_steps,
        guidance_scale=a.guidance_scale,
        gradient_checkpointing=a.algo == "alignprop" and a.checkpointing in ("policy", "both"),
        autocast="bfloat16" if bf16 and not a.use_lora else None,
        device_generators=a.device_generators,
        compile=json.loads(a.compile) if a.compile else False,
    )
    if a.algo == "ddpo":
        algorithm = DDPO(
            clip_range=a.clip_range,
            adv_clip_max=5.0,
            advantages="batch",  # TRL's default (per_prompt_stat_tracking off)
            timestep_fraction=1.0,
            num_inner_epochs=1,
            train_batch_size=a.train_batch_size or a.sample_batch_size,
        )
        reward, lr, batch, batches = (
            JpegCompressibility(quality=95),
            a.lr or 3e-4,
            a.sample_batch_size,
            a.num_batches,
        )
    else:
        # TRL truncates at random per step in (0, T); AlignProp here keeps the last K ~ U[1, T] steps
        algorithm = AlignProp(k_min=1, k_max=a.num_steps, reward_scale=1.0)
        reward, lr, batch, batches = TargetColor(rgb=pc.TARGET_RGB), a.lr or 1e-3, a.batch_size, a.grad_accum
    fused = a.fused_adam if a.fused_adam is not None else a.device == "cuda"
    optimizer = partial(
        torch.optim.AdamW, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8, fused=fused
    )
    module = AlignmentModule(
        policy,
        algorithm,
        reward,
        optimizer=optimizer,
        max_grad_norm=1.0,
        seed=a.seed,
        checkpoint_frozen_weights=False,
        rollout_chunk_size=a.rollout_chunk if a.algo == "ddpo" and a.rollout_chunk else None,
        async_reward=bool(a.algo == "ddpo" and a.rollout_chunk and a.async_reward),
    )
    data = PromptDataModule(
        prompts=list(pc.PROMPTS),
        batch_size=batch,
        batches_per_epoch=batches,
        seed=a.seed,
        eval_prompts=[pc.PROMPTS[0]],
        eval_seeds_per_prompt=1,
    )
    options = {
        "channels_last": a.channels_last,
        "device_generators": a.device_generators,
        "fused_adamw": fused,
        "autocast": policy.autocast,
        "lora_base_dtype": "bfloat16" if bf16 and a.use_lora else None,
        "compile": a.compile,
        "cudnn_benchmark": a.cudnn_benchmark,
        "decode_chunk_size": a.decode_chunk_size,
        "checkpointing": a.checkpointing if a.algo == "alignprop" else a.checkpointing in ("unet", "both"),
        "train_batch_size": (a.train_batch_size or a.sample_batch_size) if a.algo == "ddpo" else None,
        "rollout_chunk_size": a.rollout_chunk,
        "async_reward": a.async_reward,
    }
    return module, data, options


def instrument(module, clock, values: list[float]) -> None:
    """Mark the peer harness's events: a sampling batch starts when its conditions are encoded or its
    rollout starts (TRL: at its prompt function); the reward's own call is bracketed (after the VAE
    decode, which is sampling, as in TRL's pipeline)."""
    policy, reward = module.policy, module.reward
    rollout, condition, forward = policy.rollout, policy.backbone.condition, reward.forward

    def timed_rollout(*args, **kwargs):
        clock.mark("batch_start")
        return rollout(*args, **kwargs)

    def timed_condition(*args, **kwargs):
        clock.mark("batch_start")
        return condition(*args, **kwargs)

    def timed_forward(*args, **kwargs):
        clock.mark("reward_in")
        out = forward(*args, **kwargs)
        scores = out.scores if hasattr(out, "scores") else out
        values.extend(scores.detach().float().cpu().tolist())
        clock.mark("reward_out")
        return out

    policy.rollout, policy.backbone.condition, reward.forward = timed_rollout, timed_condition, timed_forward


def sync_audit(policy, prompts: list[str]) -> dict[str, Any]:
    """Host synchronisations of no-grad rollouts of 2 and 6 steps, counted by CUDA's sync debug mode: a count
    that grows with the steps means a synchronisation inside the denoising loop."""
    import warnings

    import torch

    from diffalign.core.sampling import policy_generators

    cond = policy.backbone.condition({"prompt": prompts})
    counts = {}
    saved = policy.num_steps
    try:
        for steps in (1, 2, 6):  # the first is a warm-up
            policy.num_steps = steps
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    policy.rollout(cond, policy_generators(policy, range(len(prompts))))
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            counts[steps] = {"syncs": len(msgs), "first": msgs[:3]}
    finally:
        policy.num_steps = saved
    return {
        "syncs_at_2_steps": counts[2]["syncs"],
        "syncs_at_6_steps": counts[6]["syncs"],
        "per_step_sync": counts[6]["syncs"] > counts[2]["syncs"],
        "examples": counts[6]["first"],
    }


def profile_top(policy, prompts: list[str], device: str, rows: int = 15) -> list[dict[str, Any]]:
    """The top kernels (self device time; CPU: self CPU time) of 2 no-grad sampling steps plus one DDPO-style
    re-scoring forward and backward: where the time of a training step goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffalign.core.sampling import policy_generators

    cond = policy.backbone.condition({"prompt": prompts})
    saved = policy.num_steps
    policy.num_steps = 2
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            with torch.no_grad():
                traj = policy.rollout(cond, policy_generators(policy, range(len(prompts))))
            new = policy.log_prob(
                traj, torch.zeros(len(prompts), dtype=torch.long, device=traj.states.device)
            )
            new.log_prob.mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        policy.num_steps = saved
        policy.zero_grad(set_to_none=True)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "name": e.key[:90],
            "self_ms": getattr(e, key) / 1000,
            "share": getattr(e, key) / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def diffalign_row(a: argparse.Namespace) -> None:
    import lightning as L
    import numpy as np
    import torch

    sys.path.insert(0, str(PEER))
    import peer_common as pc

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True  # what TRL's allow_tf32 (default on) sets
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    module, data, options = build_diffalign(a)
    build_s = time.perf_counter() - t0
    clock, mem = pc.Clock(cuda), pc.MemoryMeter(cuda)
    values: list[float] = []
    instrument(module, clock, values)
    epochs: list[dict[str, Any]] = []
    samples_per_epoch = (
        (a.sample_batch_size * a.num_batches) if a.algo == "ddpo" else a.batch_size * a.grad_accum
    )

    class EpochMeter(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            clock.reset()
            values.clear()
            self.batch_metrics: list[dict[str, float]] = []
            mem.start()
            self.t_start = clock.now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = trainer.callback_metrics
            keys = ("loss", "first_update_ratio_dev", "clipfrac", "approx_kl", "grad_steps")
            self.batch_metrics.append({k: float(m[f"train/{k}"]) for k in keys if f"train/{k}" in m})

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            t_end = clock.now()
            ph = pc.split_phases(clock.events, self.t_start, t_end)
            m = mem.read()

            def first(k: str) -> float | None:
                vs = [b[k] for b in self.batch_metrics if k in b]
                return (max(vs) if k == "first_update_ratio_dev" else float(np.mean(vs))) if vs else None

            epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "n_samples": len(values),
                    "reward_mean": float(np.mean(values)),
                    "reward_std": float(np.std(values)),
                    **ph,
                    "samples_per_s_sampling": len(values) / ph["sampling_s"],
                    "samples_per_s_epoch": len(values) / ph["epoch_s"],
                    "optimizer_steps": len(self.batch_metrics),
                    **{
                        k: first(k)
                        for k in ("loss", "first_update_ratio_dev", "clipfrac", "approx_kl", "grad_steps")
                    },
                    **m,
                }
            )
            e = epochs[-1]
            peak = m.get("gpu_peak_alloc_mib", m["cpu_peak_rss_mib"])
            print(
                f"[diffalign {a.algo}] epoch {e['epoch']}: reward {e['reward_mean']:.4f}, "
                f"sampling {ph['sampling_s']:.2f}s reward {ph['reward_s']:.2f}s train {ph['train_s']:.2f}s, "
                f"{e['samples_per_s_sampling']:.2f} smp/s sampling, {e['samples_per_s_epoch']:.2f} smp/s "
                f"end-to-end, peak {peak:.0f} MiB, "
                f"ratio dev {e['first_update_ratio_dev']}",
                flush=True,
            )

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="32-true",
        max_epochs=a.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[EpochMeter()],
    )
    trainable = sum(p.numel() for p in module.policy.backbone.trainable_parameters())
    sd = module.policy.backbone.inner if a.use_lora else module.policy.backbone
    print(
        f"[diffalign {a.algo}] {a.device} | lora={a.use_lora} mp={a.mixed_precision} res={a.resolution} "
        f"steps={a.num_steps} samples/epoch={samples_per_epoch} trainable={trainable / 1e6:.3f}M | "
        f"build {build_s:.1f}s "
        f"| options {options}",
        flush=True,
    )
    trainer.fit(module, datamodule=data)
    if len(epochs) != a.epochs or any(e["n_samples"] != samples_per_epoch for e in epochs):
        raise SystemExit(
            f"expected {a.epochs} epochs of {samples_per_epoch} samples, got "
            f"{[e['n_samples'] for e in epochs]}"
        )

    prompts = list(pc.PROMPTS[: (a.sample_batch_size if a.algo == "ddpo" else a.batch_size)])
    extras: dict[str, Any] = {}
    if cuda and a.sync_audit:
        extras["sync_audit"] = sync_audit(module.policy, prompts)
        print(f"[diffalign {a.algo}] sync audit: {extras['sync_audit']}", flush=True)
    if a.profile:
        extras["profile_top"] = profile_top(module.policy, prompts, a.device)
        for row in extras["profile_top"][:8]:
            print(
                f"[diffalign {a.algo}] profile {row['share']:6.1%} {row['self_ms']:9.2f} ms  {row['name']}",
                flush=True,
            )
    if a.compile:
        extras["compile_s_estimate"] = epochs[0]["epoch_s"] - epochs[-1]["epoch_s"]
    steady = epochs[1:] or epochs
    summary = {
        "trainer": f"diffalign.{'DDPO' if a.algo == 'ddpo' else 'AlignProp'}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "func"},
        "versions": {**pc.versions(), "diffalign_commit": git_commit()},
        "device": pc.device_info(a.device),
        "options": options,
        "model": {
            "path": str(a.model),
            **{
                f"{n}_params": sum(p.numel() for p in getattr(sd, n).parameters())
                for n in ("unet", "vae", "text_encoder")
            },
            "trainable_params": trainable,
        },
        "setup": {"build_s": build_s},
        "epochs": epochs,
        "totals": {
            "wall_s": sum(e["epoch_s"] for e in epochs),
            "sampling_s": sum(e["sampling_s"] for e in epochs),
            "reward_s": sum(e["reward_s"] for e in epochs),
            "train_s": sum(e["train_s"] for e in epochs),
            "samples": sum(e["n_samples"] for e in epochs),
            "steady_samples_per_s_sampling": float(np.mean([e["samples_per_s_sampling"] for e in steady])),
            "steady_samples_per_s_epoch": float(np.mean([e["samples_per_s_epoch"] for e in steady])),
            "peak_mib": max(e.get("gpu_peak_alloc_mib", e["cpu_peak_rss_mib"]) for e in epochs),
            "peak_kind": "cuda.max_memory_allocated" if cuda else "cpu ru_maxrss",
        },
        **extras,
    }
    pc.write_json(str(a.out), summary)
    t = summary["totals"]
    print(
        f"[diffalign {a.algo}] steady {t['steady_samples_per_s_sampling']:.3f} smp/s sampling, "
        f"{t['steady_samples_per_s_epoch']:.3f} smp/s end-to-end, peak {t['peak_mib']:.0f} MiB; "
        f"wrote {a.out}",
        flush=True,
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, timeout=10)
        return out.stdout.decode().strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------
# levers: the speed options one at a time on the UNet and the VAE
# ---------------------------------------------------------------------------------------------------
def levers(a: argparse.Namespace) -> None:
    """Median time of one guided UNet call at the sampling batch (no grad) and of one forward + backward at
    the training batch, per option; the first call's time (compilation, autotuning); chunked VAE decode;
    noise drawn on the device vs on the CPU and copied. Each case builds its backbone afresh."""
    import torch

    from diffalign.core.functional import masked_noise
    from diffalign.core.lora import LoRABackbone
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sampling import row_generators
    from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    dev = torch.device(a.device)
    end = time.monotonic() + a.budget
    out: list[dict[str, Any]] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, reps: int) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return first, 1000 * statistics.median(ts)

    def case(
        name: str, lora: bool, bf16: bool, channels_last: bool, compile_opts: Any, train: bool, need_s: float
    ):
        if time.monotonic() + need_s > end:
            out.append({"name": name, "skipped": "time budget"})
            return
        torch._dynamo.reset()
        sd = StableDiffusionBackbone(
            str(a.model),
            resolution=a.resolution,
            dtype="bfloat16" if bf16 else "float32",
            channels_last=channels_last,
        )
        bb = LoRABackbone(sd, rank=4, alpha=4, base_dtype="bfloat16" if bf16 else None) if lora else sd
        policy = DiffusionPolicy(
            bb,
            num_steps=50,
            guidance_scale=5.0,
            autocast="bfloat16" if bf16 and not lora else None,
            compile=compile_opts or False,
        ).to(dev)
        cond = bb.condition({"prompt": ["a photo of a cat"] * a.batch_size})
        x = torch.randn(a.batch_size, sd.latent_channels, sd.latent_size, sd.latent_size, device=dev)
        t = torch.full((a.batch_size,), 500, device=dev)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def forward() -> None:
            with torch.no_grad():
                policy.model_output(x, t, cond)

        def fwd_bwd() -> None:
            policy.model_output(x, t, cond).square().mean().backward()

        rec: dict[str, Any] = {"name": name}
        rec["first_call_s"], rec["forward_ms"] = timed(forward, a.reps)
        if train:
            _, rec["train_ms"] = timed(fwd_bwd, max(2, a.reps // 2))
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        out.append(rec)
        print(f"[levers] {rec}", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    fast = 30.0 if cuda else 5.0
    case("LoRA, bf16 base (the DDPO LoRA row)", True, True, False, None, True, fast)
    case("LoRA, bf16 base, channels_last", True, True, True, None, True, fast)
    case("LoRA, float32 (no bf16)", True, False, False, None, True, fast)
    case("full, float32 weights + bf16 autocast", False, True, False, None, True, fast)
    case("full, bf16 autocast, channels_last", False, True, True, None, True, fast)

    # noise: per-row generators on the device vs on the CPU (a copy per step)
    if time.monotonic() + 10 < end:
        shape = (a.batch_size, 4, a.resolution // 8, a.resolution // 8)
        seeds = list(range(a.batch_size))
        for where in ("cpu", a.device) if cuda else ("cpu",):
            gens = row_generators(seeds, where)
            _, ms = timed(lambda gens=gens: masked_noise(shape, gens, device=dev), a.reps * 5)
            out.append({"name": f"step noise, per-row generators on {where}", "forward_ms": ms})
            print(f"[levers] {out[-1]}", flush=True)

    # VAE decode of the batch at once vs in chunks of 2 (memory)
    if time.monotonic() + fast < end:
        for chunk in (None, 2):
            sd = StableDiffusionBackbone(
                str(a.model), resolution=a.resolution, dtype="bfloat16", decode_chunk_size=chunk
            ).to(dev)
            from diffalign.core.reward import SampleView

            z = torch.randn(a.batch_size, 4, a.resolution // 8, a.resolution // 8, device=dev)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                _, ms = timed(lambda sd=sd, z=z: SampleView(sd, z).get({}), max(2, a.reps // 2))
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            out.append({"name": f"VAE decode, chunk {chunk or 'all'}", "forward_ms": ms, "peak_gib": peak})
            print(f"[levers] {out[-1]}", flush=True)
            del sd

    # compilation last: it takes minutes on an SD UNet (first call); CUDA graphs only make sense on a GPU
    if not a.no_compile:
        need = 240.0 if cuda else 60.0
        case("LoRA, bf16 base, torch.compile", True, True, a.channels_last_for_compile, {}, False, need)
        if cuda:
            case(
                "LoRA, bf16 base, compile reduce-overhead (CUDA graphs)",
                True,
                True,
                a.channels_last_for_compile,
                {"mode": "reduce-overhead"},
                False,
                need,
            )
    Path(a.out).write_text(
        json.dumps({"device": a.device, "batch_size": a.batch_size, "levers": out}, indent=1) + "\n"
    )


# ---------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="the driver")
    r.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    r.add_argument("--out", default="sd_gpu_out", help="sd_gpu.json, sd_gpu.md, sd_gpu.log")
    r.add_argument("--work", default=None, help="the pipeline and per-row JSON (default: <out>/work)")
    r.add_argument("--model", type=Path, default=None, help="pipeline folder (default: <work>/<preset>)")
    r.add_argument("--rows", default=",".join(ROWS), type=lambda s: [x for x in s.split(",") if x])
    r.add_argument("--frameworks", default="trl,diffalign", type=lambda s: [x for x in s.split(",") if x])
    r.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="ROW:FLAGS",
        help="an extra diffalign row with worker flags, e.g. 'alignprop_lora:--checkpointing none'",
    )
    r.add_argument("--repeats", type=int, default=1, help="runs of each row (median)")
    r.add_argument(
        "--budget",
        type=float,
        default=510.0,
        help="seconds for the whole run (rows that no longer fit are skipped)",
    )
    r.add_argument(
        "--min-row-s",
        type=float,
        default=None,
        help="a row starts only with this much budget left (default: 75 s on cuda, 45 s on a CPU)",
    )
    r.add_argument("--min-levers-s", type=float, default=40.0)
    r.add_argument("--reserve-s", type=float, default=8.0, help="kept back for the table at the end")
    r.add_argument("--row-timeout", type=float, default=200.0)
    r.add_argument("--build-timeout", type=float, default=150.0)
    r.add_argument("--peer-site", default=None, help="folder with TRL (and carried wheels) put on PYTHONPATH")
    r.add_argument(
        "--peer-unavailable",
        default=None,
        metavar="REASON",
        help="TRL cannot be imported (sd_gpu.sh's preflight): run diffalign's rows only and say why",
    )
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--levers", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--lever-flags", default="", type=lambda s: s.split())
    r.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument(
        "--diffalign-flags", default="", type=lambda s: s.split(), help="passed to every diffalign row"
    )
    for k in PRESETS["sd15"]:
        r.add_argument(
            f"--{k.replace('_', '-')}",
            type=str if k == "mp" else int,
            default=None,
            help="overrides the preset",
        )

    w = sub.add_parser("diffalign", help="one diffalign row")
    w.add_argument("--algo", choices=["ddpo", "alignprop"], required=True)
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    w.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    w.add_argument("--use-lora", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--resolution", type=int, default=512)
    w.add_argument("--num-steps", type=int, default=50)
    w.add_argument("--epochs", type=int, default=2)
    w.add_argument("--sample-batch-size", type=int, default=8, help="DDPO samples per rollout batch")
    w.add_argument("--num-batches", type=int, default=2, help="DDPO rollout batches per epoch")
    w.add_argument("--batch-size", type=int, default=4, help="AlignProp samples per step")
    w.add_argument("--grad-accum", type=int, default=2, help="AlignProp steps per epoch")
    w.add_argument(
        "--lr", type=float, default=None, help="default: TRL's script defaults (3e-4 DDPO, 1e-3 AlignProp)"
    )
    w.add_argument(
        "--train-batch-size",
        type=int,
        default=None,
        help="DDPO micro-batch of the re-scoring passes (default: the sample batch, TRL's default)",
    )
    w.add_argument("--guidance-scale", type=float, default=5.0)
    w.add_argument("--eta", type=float, default=1.0)
    w.add_argument("--clip-range", type=float, default=1e-4)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, default=None)
    w.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on with --device cuda, off on a CPU",
    )
    w.add_argument("--device-generators", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument(
        "--fused-adam", action=argparse.BooleanOptionalAction, default=None, help="default: on with cuda"
    )
    w.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument(
        "--compile",
        default=None,
        help="torch.compile arguments as JSON, e.g. '{}' or '{\"mode\": \"reduce-overhead\"}'",
    )
    w.add_argument("--decode-chunk-size", type=int, default=None)
    w.add_argument(
        "--checkpointing",
        choices=["none", "policy", "unet", "both"],
        default="policy",
        help="AlignProp: checkpoint each kept denoiser call (policy, TRL's choice), inside the UNet, both",
    )
    w.add_argument(
        "--rollout-chunk", type=int, default=None, help="DDPO: sample a batch in chunks of this many rows"
    )
    w.add_argument(
        "--async-reward", action="store_true", help="DDPO: score a chunk while the next one samples"
    )
    w.add_argument("--profile", action="store_true", help="top kernels of a short sampling + training step")
    w.add_argument("--sync-audit", action=argparse.BooleanOptionalAction, default=True, help="CUDA only")

    lv = sub.add_parser("levers", help="micro-benchmark of the speed options")
    lv.add_argument("--model", type=Path, required=True)
    lv.add_argument("--out", type=Path, required=True)
    lv.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    lv.add_argument("--resolution", type=int, default=512)
    lv.add_argument("--batch-size", type=int, default=8)
    lv.add_argument("--reps", type=int, default=6)
    lv.add_argument("--budget", type=float, default=120.0)
    lv.add_argument("--threads", type=int, default=None)
    lv.add_argument("--no-compile", action="store_true")
    lv.add_argument("--channels-last-for-compile", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "run":
        a.work = Path(a.work) if a.work else Path(a.out) / "work"
        a.model = a.model or a.work / a.preset
        a.extra = [tuple(e.split(":", 1)) if ":" in e else (e, "") for e in a.extra]
    if a.cmd == "diffalign" and a.channels_last is None:
        a.channels_last = a.device == "cuda"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.cmd == "run":
        return driver(a)
    sys.path.insert(0, str(PEER))
    if a.cmd == "diffalign":
        diffalign_row(a)
    else:
        levers(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
