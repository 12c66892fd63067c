"""Molecule alignment benchmark: QED and validity of the shipped base model vs the DDPO-aligned model.

Runs `recipes/molecule/ddpo_qed.yaml` through the CLI (in-process), then samples the base and the aligned
backbone with the same per-sample seeds and the recipe's sampler, and prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/molecule_alignment.py [--epochs 20] [--num-samples 512]

Writes benchmarks/results/molecule_alignment.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "molecule" / "ddpo_qed.yaml"
OUT = REPO / "benchmarks" / "results" / "molecule_alignment.json"


def _reward_curve(path: Path) -> list[dict]:
    """Per-step training reward mean and invalid fraction from the run's metrics.csv."""
    import csv

    if not path.is_file():
        return []
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/reward_mean"):
                out.append(
                    {
                        "step": int(row["step"]),
                        "reward_mean": round(float(row["train/reward_mean"]), 4),
                        "invalid": round(float(row.get("train/reward/invalid") or "nan"), 4),
                    }
                )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="DDPO epochs (default: the recipe's)")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234, help="first evaluation seed")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from diffalign.core.cli import cli_main
    from diffalign.modalities.molecule import MoleculeBackbone
    from diffalign.modalities.molecule.data import ConformerDataset
    from diffalign.modalities.molecule.metrics import sample_molecules, summarize

    train_smiles = ConformerDataset().smiles
    args = ["fit", "--config", str(RECIPE), "--trainer.enable_progress_bar=false"]
    args += ["--trainer.enable_model_summary=false", "--data.init_args.eval_seeds_per_prompt=8"]
    if a.epochs is not None:
        args.append(f"--trainer.max_epochs={a.epochs}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cli = cli_main([*args, "--run_root", tmp])
        train_seconds = time.time() - t0
        policy = cli.model.policy
        steps = int(cli.trainer.global_step)
        curve = _reward_curve(Path(cli.trainer.log_dir) / "metrics.csv")
    aligned = policy.backbone
    rows = {}
    for name, backbone in (("base", MoleculeBackbone()), ("ddpo", aligned)):
        policy.backbone = backbone  # the same sampler and per-sample seeds for both
        samples = sample_molecules(policy, a.num_samples, seed=a.seed)
        rows[name] = summarize(samples, train_smiles)
    result = {
        "recipe": str(RECIPE.relative_to(REPO)),
        "num_samples": a.num_samples,
        "sampler": f"{type(policy.kernel).__name__} eta={getattr(policy.kernel, 'eta', None)}, "
        f"{policy.num_steps} steps",
        "optimizer_steps": steps,
        "train_seconds": round(train_seconds, 1),
        "train_reward_curve": curve,
        "base": rows["base"],
        "ddpo": rows["ddpo"],
    }
    print("| model | QED mean (invalid = 0) | QED mean (valid) | validity | uniqueness |")
    print("|---|---|---|---|---|")
    for name in ("base", "ddpo"):
        r = rows[name]
        qv = f"{r['qed_mean']:.3f}" if r["qed_mean"] is not None else "n/a"
        q0, v, u = r["qed_mean_invalid_as_0"], r["validity"], r["uniqueness"]
        print(f"| {name} | {q0:.3f} | {qv} | {v:.3f} | {u:.3f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
