"""Benchmark multi-process training and cluster scoring on the CPU: 1 vs 2 processes, process pool vs Ray.

    python benchmarks/distributed.py                         # toy + digits training, 20 k SMILES scoring
    python benchmarks/distributed.py --part train --steps 4
    python benchmarks/distributed.py --part score --n 100000

Training: `diffalign fit` on a recipe (the toy's `toy/ddpo_mode`, the digits' `image/ddpo_digit_fidelity`)
with the same global batch on 1 process and on 2 processes (DDP over gloo, launched as torchrun would:
MASTER_ADDR, WORLD_SIZE, LOCAL_RANK in each process's environment, each an OS process of its own).
A callback in every rank times the training steps only (from the first training batch to the end of
fit's training, evaluation and start-up excluded) and reads the rank's peak resident memory
(VmHWM). Samples/s = rollout samples of the global batch × steps / the slowest rank's seconds; the
table reports the 2-process/1-process ratio. On a machine whose cores are shared the ratio says how
much of the work the second process overlaps, not what a GPU node does.

Scoring: `diffalign score FILE -r qed,sa,logp` with the process pool (`--workers W`) and with
`--engine ray` (a local Ray instance of W CPUs started by the command): wall seconds including start-up
(Ray's is several seconds), rows/s, and the scoring driver's peak memory; the two outputs are checked
to be the same rows. SMILES are the molecule benchmark's (RDKit's NCI set as random SMILES variants).

Prints a markdown table and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "distributed.json"
TIMING_ENV = "DIFFALIGN_BENCH_TIMING"

#: recipe and the global batch (conditions per optimiser step; DDPO samples each once)
TRAIN = {
    "toy": ("toy/ddpo_mode", 32),
    "digits": ("image/ddpo_digit_fidelity", 8),
}


class TrainTiming(L.Callback):
    """Times the training steps of this rank and writes {rank, seconds, steps, peak_rss_mb} as JSON to
    `$DIFFALIGN_BENCH_TIMING.<rank>.json`."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.steps += 1
        self.t1 = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        out = os.environ.get(TIMING_ENV)
        if not out or self.t0 is None:
            return
        rank = trainer.global_rank
        peak = peak_rss_mb()
        record = {"rank": rank, "seconds": self.t1 - self.t0, "steps": self.steps, "peak_rss_mb": peak}
        Path(f"{out}.{rank}.json").write_text(json.dumps(record))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries the peak of the process
    that forked it across exec, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_once(recipe: str, world: int, conditions: int, steps: int, folder: Path) -> dict[str, Any]:
    """One `diffalign fit` of `steps` global batches of `conditions` on `world` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    timing = folder / "timing"
    argv = [
        sys.executable,
        "-m",
        "diffalign.core.cli",
        "fit",
        "--config",
        recipe,
        "--run_root",
        str(folder / "runs"),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.max_epochs=1",
        "--trainer.callbacks+=benchmarks.distributed.TrainTiming",
        f"--data.init_args.batch_size={conditions // world}",
        f"--data.init_args.batches_per_epoch={steps * world}",
        "--data.init_args.eval_seeds_per_prompt=1",
    ]
    if world > 1:
        argv += [f"--trainer.devices={world}", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *sys.path])
        env[TIMING_ENV] = str(timing)
        if world > 1:
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world),
                NODE_RANK="0",
                LOCAL_RANK=str(rank),
            )
        log = open(folder / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log), log))
    for rank, (p, log) in enumerate(procs):
        code = p.wait(timeout=1800)
        log.close()
        if code != 0:
            tail = (folder / f"rank{rank}.log").read_text()[-2000:]
            raise RuntimeError(f"{recipe} on {world} processes failed ({code}):\n{tail}")
    ranks = [json.loads(Path(f"{timing}.{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {
        "recipe": recipe,
        "processes": world,
        "global_conditions_per_step": conditions,
        "steps": ranks[0]["steps"],
        "seconds": seconds,
        "samples_per_s": conditions * ranks[0]["steps"] / seconds,
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
    }


def bench_train(names: list[str], steps: int, work: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        recipe, conditions = TRAIN[name]
        one = train_once(recipe, 1, conditions, steps, work / f"{name}_1")
        two = train_once(recipe, 2, conditions, steps, work / f"{name}_2")
        rows.append(
            {
                "task": name,
                "one": one,
                "two": two,
                "speedup": two["samples_per_s"] / one["samples_per_s"],
                "memory_ratio": max(two["peak_rss_mb_per_rank"]) / max(one["peak_rss_mb_per_rank"]),
            }
        )
    return rows


SCORE = r"""
import sys
from diffalign.rewards.scoring import main
code = main(sys.argv[1:])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print(hwm[0].split()[1])  # kB, the driver's own peak (ru_maxrss would carry the parent's across exec)
sys.exit(code)
"""


def score_once(src: Path, out: Path, engine: str, workers: int, chunk: int) -> dict[str, Any]:
    args = [
        str(src),
        "-r",
        "qed,sa,logp",
        "-o",
        str(out),
        "--workers",
        str(workers),
        "--chunk-size",
        str(chunk),
    ]
    args += ["--engine", engine, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", SCORE, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"scoring with {engine} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"engine": engine, "seconds": dt, "driver_peak_rss_mb": int(p.stdout.split()[-1]) / 1024}


def bench_score(n: int, workers: int, chunk: int, work: Path) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("molecule_scoring", HERE / "molecule_scoring.py")
    molecule_scoring = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(molecule_scoring)  # the molecule benchmark's SMILES file
    src = molecule_scoring.make_smiles_file(work / f"smiles_{n}.smi", n)
    runs = {e: score_once(src, work / f"{e}.csv", e, workers, chunk) for e in ("pool", "ray")}
    with open(work / "pool.csv", newline="") as a, open(work / "ray.csv", newline="") as b:
        same = list(csv.reader(a)) == list(csv.reader(b))
    for r in runs.values():
        r["rows_per_s"] = n / r["seconds"]
    return {"rows": n, "workers": workers, "chunk_size": chunk, "same_rows": same, **runs}


def table(train: list[dict[str, Any]], score: dict[str, Any] | None) -> str:
    lines = []
    if train:
        lines += [
            "| task | 1 process samples/s | 2 processes samples/s | ratio | peak MB/rank (1 → 2) |",
            "|---|---|---|---|---|",
        ]
        for r in train:
            one, two = r["one"], r["two"]
            mem = f"{max(one['peak_rss_mb_per_rank']):.0f} → {max(two['peak_rss_mb_per_rank']):.0f}"
            lines.append(
                f"| {r['task']} ({one['recipe']}, {one['global_conditions_per_step']} conditions/step, "
                f"{one['steps']} steps) | {one['samples_per_s']:.1f} | {two['samples_per_s']:.1f} | "
                f"{r['speedup']:.2f} | {mem} |"
            )
    if score:
        lines += [
            "",
            f"| scoring {score['rows']} SMILES (qed, sa, logp), {score['workers']} workers | wall s "
            "| rows/s | driver peak MB |",
            "|---|---|---|---|",
        ]
        for e in ("pool", "ray"):
            s = score[e]
            lines.append(
                f"| {e} | {s['seconds']:.1f} | {s['rows_per_s']:.0f} | {s['driver_peak_rss_mb']:.0f} |"
            )
        lines.append(f"\nsame rows from both engines: {score['same_rows']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "train", "score"), default="all")
    ap.add_argument("--tasks", default="toy,digits", help="training tasks: toy, digits")
    ap.add_argument("--steps", type=int, default=3, help="global training steps per run")
    ap.add_argument("--n", type=int, default=20_000, help="SMILES to score")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = bench_train(args.tasks.split(","), args.steps, work) if args.part != "score" else []
        score = bench_score(args.n, args.workers, args.chunk_size, work) if args.part != "train" else None
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/distributed.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}",
    }
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["train"] = train or previous.get("train", [])
    result["score"] = score or previous.get("score")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["train"], result["score"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
