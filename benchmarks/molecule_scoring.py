"""Benchmark `diffalign score` on SMILES: throughput against a plain RDKit loop, and peak memory vs rows.

    python benchmarks/molecule_scoring.py                       # 100 k throughput, memory at 10 k and 200 k
    python benchmarks/molecule_scoring.py --n 20000 --memory-rows 10000,50000
    python benchmarks/molecule_scoring.py --million             # adds the 1 M-row memory point (slow)

Inputs are RDKit's 4,999 NCI SMILES (`RDConfig.RDDataDir/NCI/first_5K.smi`), each written as random
(non-canonical) SMILES variants so that no two lines of the file are the same string, repeated to the
requested size. Both contenders run as separate processes, read the same file and write a CSV:

- baseline: one process, `MolFromSmiles` then the same functions (QED.qed, sascorer.calculateScore,
  Crippen.MolLogP) in a plain loop;
- engine: `diffalign score FILE -r qed,sa,logp --workers W` (W = all cores by default): the Reward
  classes QED, SAScore, LogP built in each worker, molecules read by the molecule modality's reader.

The two outputs are checked to agree on every row (qed and logp as float32, sa = (10 − SA)/9, the
normalised score SAScore gives).

Peak memory is the maximum resident set size (ru_maxrss) of the scoring command's main process and of its
largest worker, scoring the cheap `mw` reward so that the runs stay short; flat memory means the main
process's peak does not grow with the number of rows. Prints a markdown table and writes
benchmarks/results/molecule_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "molecule_scoring.json"
REWARDS = "qed,sa,logp"


def make_smiles_file(path: Path, n: int, seed: int = 0) -> Path:
    """`n` SMILES lines: the NCI set written as random SMILES variants, cycled."""
    import random

    from rdkit import Chem, RDConfig, rdBase

    if path.exists() and count_rows(path) + 1 == n:
        return path
    rng = random.Random(seed)
    src = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    with rdBase.BlockLogs():
        mols = [Chem.MolFromSmiles(line.split()[0]) for line in src.read_text().splitlines() if line.strip()]
    mols = [m for m in mols if m is not None]
    variants = min(n, 50_000)  # distinct strings; larger files cycle through them
    pool = []
    for i in range(variants):
        m = mols[i % len(mols)]
        pool.append(
            Chem.MolToSmiles(m, doRandom=True, canonical=False) if i >= len(mols) else Chem.MolToSmiles(m)
        )
    rng.shuffle(pool)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(f"{pool[i % variants]} m{i}\n")
    os.replace(tmp, path)
    return path


BASELINE = r"""
import csv, os, sys, resource, time
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen
import importlib.util
path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
spec = importlib.util.spec_from_file_location("sascorer", path)
sascorer = importlib.util.module_from_spec(spec); spec.loader.exec_module(sascorer)
src, dst = sys.argv[1], sys.argv[2]
rdBase.DisableLog("rdApp.*")
with open(src) as f, open(dst, "w", newline="") as out:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["id", "smiles", "qed", "sa", "logp", "error"])
    for i, line in enumerate(f, 1):
        parts = line.split()
        m = Chem.MolFromSmiles(parts[0]) if parts else None
        if m is None:
            w.writerow([i, parts[0] if parts else "", "", "", "", "invalid"])
            continue
        name = parts[1] if len(parts) > 1 else i
        w.writerow([name, parts[0], QED.qed(m), sascorer.calculateScore(m), Crippen.MolLogP(m), ""])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

ENGINE = r"""
import resource, sys
from diffalign.rewards.scoring import main
code = main(sys.argv[1:])
usage = resource.getrusage
print(usage(resource.RUSAGE_SELF).ru_maxrss, usage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


CPU_SECONDS: list[float] = []  # CPU time (user + sys) of the last run, its workers included


def run(code: str, args: list[str]) -> tuple[float, list[int]]:
    import resource

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[:] = [after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime]
    if p.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, [int(x) for x in p.stdout.split()]


def check_agreement(baseline: Path, engine: Path) -> int:
    """Rows where the engine's scores differ from the plain loop's (float32; sa normalised)."""
    import csv

    import numpy as np

    def f32(x: str) -> float:
        return float(np.float32(float(x))) if x else float("nan")

    bad = 0
    with open(baseline, newline="") as fb, open(engine, newline="") as fe:
        for b, e in zip(csv.DictReader(fb), csv.DictReader(fe), strict=True):
            want = (
                f32(b["qed"]),
                f32(str((10 - float(b["sa"])) / 9)) if b["sa"] else float("nan"),
                f32(b["logp"]),
            )
            got = (f32(e["qed"]), f32(e["sa"]), f32(e["logp"]))
            same = all(
                (np.isnan(w) and np.isnan(g)) or abs(w - g) <= 1e-6 * max(1.0, abs(w))
                for w, g in zip(want, got, strict=True)
            )
            bad += not same or b["id"] != e["id"]
    return bad


def count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="SMILES for the throughput comparison")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--memory-rows", default="10000,200000", help="comma-separated row counts")
    ap.add_argument("--million", action="store_true", help="also measure memory at 1,000,000 rows")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "diffalign_bench"))
    args = ap.parse_args()
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    result: dict = {
        "conditions": {
            "cpus": os.cpu_count(),
            "workers": args.workers,
            "chunk_size": args.chunk_size,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    rows_md = []
    if not args.skip_throughput:
        src = make_smiles_file(data / f"nci_{args.n}.smi", args.n)
        base_t, (base_rss,) = run(BASELINE, [str(src), str(data / "baseline.csv")])
        base_cpu = CPU_SECONDS[0]
        out = data / "engine.csv"
        eng_args = [str(src), "-r", REWARDS, "-o", str(out), "--workers", str(args.workers)]
        eng_t, (eng_rss, eng_worker_rss) = run(ENGINE, [*eng_args, "--chunk-size", str(args.chunk_size)])
        eng_cpu = CPU_SECONDS[0]
        assert count_rows(out) == count_rows(data / "baseline.csv") == args.n, "row counts differ"
        disagree = check_agreement(data / "baseline.csv", out)
        assert disagree == 0, f"{disagree} rows differ between the engine and the plain loop"
        result["throughput"] = {
            "engine": "Reward classes (core.score + modalities.molecule.io)",
            "n": args.n,
            "rewards": REWARDS,
            "baseline_s": round(base_t, 2),
            "baseline_mol_per_s": round(args.n / base_t, 1),
            "engine_s": round(eng_t, 2),
            "engine_mol_per_s": round(args.n / eng_t, 1),
            "speedup": round(base_t / eng_t, 2),
            # CPU seconds (all processes): robust to other load on a shared machine. On W idle cores the
            # engine's wall time is about max(engine_cpu_s / W, main process share), so
            # baseline_cpu_s / (engine_cpu_s / W) bounds the speedup it can reach there.
            "baseline_cpu_s": round(base_cpu, 2),
            "engine_cpu_s": round(eng_cpu, 2),
            "cpu_overhead": round(eng_cpu / base_cpu, 3),
            "idle_speedup_bound": round(base_cpu / (eng_cpu / args.workers), 2),
            "baseline_peak_rss_mb": round(base_rss / 1024, 1),
            "engine_peak_rss_mb": round(eng_rss / 1024, 1),
            "engine_worker_peak_rss_mb": round(eng_worker_rss / 1024, 1),
        }
        tp = result["throughput"]
        rows_md.append(
            f"| throughput, {args.n:,} SMILES, {REWARDS} "
            f"| plain RDKit loop: {tp['baseline_mol_per_s']:.0f} mol/s "
            f"| diffalign score --workers {args.workers}: {tp['engine_mol_per_s']:.0f} mol/s "
            f"| {tp['speedup']:.2f}× |"
        )
        rows_md.append(
            f"| CPU time, same run (load-independent) | baseline {tp['baseline_cpu_s']:.0f} CPU-s "
            f"| engine {tp['engine_cpu_s']:.0f} CPU-s (×{tp['cpu_overhead']:.2f}) "
            f"| ≤ {tp['idle_speedup_bound']:.2f}× on {args.workers} idle cores |"
        )
    sizes = [int(x) for x in args.memory_rows.split(",") if x.strip()]
    if args.million and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    result["memory"] = []
    for n in sizes:
        src = make_smiles_file(data / f"nci_{n}.smi", n)
        out = data / f"mem_{n}.csv"
        t, (rss, worker_rss) = run(
            ENGINE, [str(src), "-r", "mw", "-o", str(out), "--workers", str(args.workers)]
        )
        assert count_rows(out) == n
        result["memory"].append(
            {
                "rows": n,
                "seconds": round(t, 2),
                "main_peak_rss_mb": round(rss / 1024, 1),
                "worker_peak_rss_mb": round(worker_rss / 1024, 1),
            }
        )
        rows_md.append(
            f"| peak RSS, {n:,} rows, mw | main process {rss / 1024:.0f} MB | largest worker "
            f"{worker_rss / 1024:.0f} MB | {t:.1f} s |"
        )
    result["conditions"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"\n{os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print("| measurement | A | B | ratio / time |\n|---|---|---|---|")
    print("\n".join(rows_md))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # merge with earlier runs (e.g. a later --skip-throughput --million run keeps the throughput numbers)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    history = old.get("throughput_runs") or ([old["throughput"]] if "throughput" in old else [])
    for h in history:
        h.setdefault("conditions", old.get("conditions"))
    if "throughput" in result:
        result["throughput"]["conditions"] = result["conditions"]
        history.append(result["throughput"])
    elif "throughput" in old:
        result["throughput"] = old["throughput"]
    result["throughput_runs"] = history  # every throughput measurement so far, oldest first
    by_rows = {m["rows"]: m for m in old.get("memory", [])}
    by_rows.update({m["rows"]: m for m in result["memory"]})
    result["memory"] = [by_rows[k] for k in sorted(by_rows)]
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
