"""DDPO throughput of a recipe: rollout, update and full training-step samples/s, and peak memory.

    python benchmarks/throughput.py --config recipes/toy/ddpo_mode.yaml --device cpu --precision 32
    python benchmarks/throughput.py --device cuda --precision bf16 --batch-size 256

The recipe's `model` and `data` sections are built exactly as `diffalign fit` builds them (jsonargparse,
`class_path`); any extra `--model.…` / `--data.…` argument overrides the recipe. Phases, each timed
after `--warmup` untimed iterations, median over `--repeats`:

- rollout: one no-grad `policy.rollout` of a batch of conditions (sampling only);
- update: the gradient phase of `AlignmentModule.training_step` on a prepared batch
  (`algorithm.minibatches` → forward, backward per micro-batch → grad clip → optimiser step);
- train_step: `algorithm.prepare` (rollout + decode + reward + advantages) plus the update.

bf16 runs the whole step under `torch.autocast(device, bfloat16, cache_enabled=False)`, as Lightning's
`bf16-mixed` does; the kernels compute log-probs in float32. Peak memory is
`torch.cuda.max_memory_allocated` per phase on CUDA and the process's peak RSS on CPU. Prints a
markdown table and writes benchmarks/results/throughput_<device>_<precision>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(configs: list[str], overrides: list[str], batch_size: int | None):
    """The recipe's AlignmentModule and data module, parsed as the CLI parses them."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning import LightningDataModule

    from diffalign.core.module import AlignmentModule
    from diffalign.core.recipes import expand_config_args

    parser = ArgumentParser(prog="throughput", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(AlignmentModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    for ignored in ("trainer", "seed_everything", "run_root", "ckpt_path"):  # used by `fit` only
        parser.add_argument(f"--{ignored}", type=object, default=None)
    args = expand_config_args([a for c in configs for a in ("--config", c)])[0] + list(overrides)
    if batch_size is not None:
        args += ["--data.init_args.batch_size", str(batch_size)]
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    cfg = instantiate(parser.parse_args(args))
    return cfg.model, cfg.data


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments (--model.…, --data.…) override the recipe.",
    )
    p.add_argument("--config", action="append", help="recipe YAML (repeat to merge)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--batch-size", type=int, default=None, help="conditions per rollout (default: recipe's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    opts, overrides = p.parse_known_args(argv)
    configs = opts.config or ["recipes/toy/ddpo_mode.yaml"]
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("throughput: --device cuda but torch.cuda.is_available() is False")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    device = torch.device(opts.device)

    from diffalign.core.algorithms.base import AlignContext

    module, data = build(configs, overrides, opts.batch_size)
    module.to(device)
    if module.reward is not None:
        module.reward.to(device)
    policy, algorithm = module.policy, module.algorithm
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    params = list(policy.backbone.trainable_parameters())
    batch = to_device(next(iter(data.train_dataloader())), device)
    ctx = AlignContext(policy, module.guarded_reward, module.generator, device)
    autocast = (
        torch.autocast(opts.device, dtype=torch.bfloat16, cache_enabled=False)
        if opts.precision == "bf16"
        else contextlib.nullcontext()
    )
    cond = policy.backbone.condition(batch)
    n = next(iter(cond.values())).shape[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def rollout() -> None:
        with torch.no_grad(), autocast:
            policy.rollout(cond, generator=module.generator)

    def prepare():
        with autocast:
            return algorithm.prepare(ctx, batch)[0]

    terms: dict[str, list[float]] = {}

    def update(prepared) -> None:  # the gradient phase of AlignmentModule.training_step
        with autocast:
            for micro_batches in algorithm.minibatches(prepared, module.generator):
                for micro in micro_batches:
                    out = algorithm(policy, micro)
                    (out["loss"] / len(micro_batches)).backward()
                    for k, v in out.items():
                        terms.setdefault(k, []).append(float(v.detach()))
                if module.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, module.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)

    def timed(fn, *a):
        sync()
        t0 = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {"rollout": [], "update": [], "train_step": []}
    peaks: dict[str, float] = {}
    policy.train()
    for phase in times:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(opts.warmup + opts.repeats):
            if phase == "rollout":
                dt, _ = timed(rollout)
            elif phase == "update":
                prepared = prepare()
                dt, _ = timed(update, prepared)
            else:
                dt, _ = timed(lambda: update(prepare()))
            if i == 0 and phase == "update":
                first = {k: v[0] for k, v in terms.items()}  # before any update: ratio must be 1
            if i >= opts.warmup:
                times[phase].append(dt)
        peaks[phase] = peak_mib(device)

    rows = []
    for phase, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {"phase": phase, "ms": 1000 * med, "samples_per_s": n / med, "peak_mem_mib": peaks[phase]}
        )
    result = {
        "configs": configs,
        "overrides": overrides,
        "device": opts.device,
        "device_name": device_name(device),
        "precision": opts.precision,
        "batch_size": n,
        "num_steps": policy.num_steps,
        "algorithm": type(algorithm).__name__,
        "threads": torch.get_num_threads(),
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "peak_mem": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "first_update_terms": first,
        "results": rows,
    }
    mem = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    print(
        f"\n{result['algorithm']} throughput: {', '.join(configs)} | {result['device_name']} | "
        f"{opts.precision} | batch {n} | {policy.num_steps} steps | {result['threads']} threads | "
        f"torch {torch.__version__}\n"
    )
    print(f"| phase | ms / batch | samples/s | {mem} |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['ms']:.1f} | {r['samples_per_s']:.0f} | {r['peak_mem_mib']:.0f} |")
    out = opts.out or RESULTS / f"throughput_{opts.device}_{opts.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfirst update, before any optimiser step (ratio_mean should be 1): {first}\nwrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
